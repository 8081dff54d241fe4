"""The package's shape: imports run only downward and without circles, lazy imports say why, the server loads no
training code, and the wheel owns one top-level name. (The layers themselves are the import-linter contract in
pyproject.toml, run by `make lint`.)"""

import ast
import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import grimp

from jaxmr.index.build import BuildOptions, build_index

from conftest import ROOT, SMOKE_SOURCE

TRAINING = ("orbax", "grain", "tensorboardX", "jaxmr.training", "jaxmr.index.build", "jaxmr.data.train_batches")


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (import circles)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_strongly_connected_finds_a_planted_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_anywhere_in_the_package():
    """The layers contract checks between layers; this checks every module, inside packages too."""
    graph = grimp.build_graph("jaxmr")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert strongly_connected(edges) == []


def _function_level_imports(path: Path) -> list[tuple[int, str, bool]]:
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            commented = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            found.append((node.lineno, module or "", commented))
    return found


def test_lazy_imports_are_for_heavy_optional_dependencies_and_say_why():
    """No jaxmr module is imported inside a function (that is how the old circles hid), except by the CLI, which
    imports each command's layers in its handler; every other lazy import carries a comment saying why."""
    problems = []
    for path in sorted((ROOT / "jaxmr").rglob("*.py")):
        rel = path.relative_to(ROOT)
        for line, module, commented in _function_level_imports(path):
            if module.split(".")[0] == "jaxmr" and rel != Path("jaxmr/cli.py"):
                problems.append(f"{rel}:{line}: imports {module} inside a function")
            elif module.split(".")[0] not in ("jaxmr", "numpy") and not commented:
                problems.append(f"{rel}:{line}: lazy import of {module} without a comment saying why")
    assert problems == []


SERVER = """
import json, sys, time
import flax.nnx
flax_loads_optax = "optax" in sys.modules  # flax.nnx imports optax for nnx.Optimizer, whoever imports nnx
sys.modules.pop("optax")
for name in [m for m in sys.modules if m.startswith("optax.")]:
    sys.modules.pop(name)
from litestar.testing import TestClient
import jaxmr.cli  # what `jaxmr serve` imports before the app
from jaxmr.serving.app import create_app
from jaxmr.serving.settings import Settings

with TestClient(create_app(Settings(index=sys.argv[1]))) as client:
    deadline = time.time() + 120
    while client.get("/readyz").status_code != 200 and time.time() < deadline:
        time.sleep(0.1)
    results = client.post("/api/search", json={"text": "a red circle", "k": 3}).json()["results"]
print(json.dumps({"results": len(results), "modules": sorted(sys.modules), "flax_loads_optax": flax_loads_optax}))
"""


def test_the_server_loads_no_training_code(smoke_run, tmp_path):
    """A running server that has answered a search has not imported orbax, grain, tensorboardX or jaxmr's
    training code, nor optax from any of jaxmr's modules (in a fresh process: this test process has imported
    everything). flax.nnx itself imports optax (for nnx.Optimizer), so the script drops optax from sys.modules
    after importing flax: were anything of ours to use optax, it would be imported again and show here."""
    index = tmp_path / "index"
    build_index(smoke_run, SMOKE_SOURCE, index, split="test", options=BuildOptions(captions=False), progress=False)
    out = subprocess.run([sys.executable, "-c", SERVER, str(index)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["results"] == 3
    loaded = [m for m in answer["modules"] if any(m == t or m.startswith(t + ".") for t in (*TRAINING, "optax"))]
    assert loaded == []
    assert answer["flax_loads_optax"]  # when a flax release stops importing it, drop the pop above
    assert "jaxmr.serving.engine" in answer["modules"] and "jaxmr.encoder" in answer["modules"]


def test_the_wheel_holds_only_the_jaxmr_namespace(tmp_path):
    """`pip wheel .`: every file of the wheel is under jaxmr/ (configs as jaxmr/configs, the UI's static files in
    jaxmr/serving/static) or its .dist-info."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = tmp_path.glob("jaxmr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"jaxmr"}
    assert "jaxmr/configs/shapes_tiny.py" in names and "jaxmr/serving/static/index.html" in names


def test_every_module_sits_in_a_layer():
    """A module the layers contract does not name is unchecked: every module of the package must be in one."""
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layers = {m.strip() for layer in contract["layers"] for m in layer.replace("|", ":").split(":")}
    graph = grimp.build_graph("jaxmr")
    loose = [m for m in graph.modules if m != "jaxmr" and not any(m == x or m.startswith(x + ".") for x in layers)]
    assert loose == []
