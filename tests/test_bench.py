"""The benchmarks' --quick modes run end to end and write well-formed results (no figures asserted)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize(
    "script", ["input_pipeline", "loss_memory", "train_throughput", "index_recall", "serve_load", "search_latency"]
)
def test_quick_mode_writes_results(tmp_path, script, request):
    out = tmp_path / f"{script}.json"
    extra = ["--workdir", str(request.getfixturevalue("smoke_run"))] if script == "serve_load" else []  # trained once
    result = subprocess.run([sys.executable, "-m", f"bench.{script}", "--quick", "--out", str(out), *extra], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == script and data["records"] and data["machine"]["cores"] >= 1
    assert out.with_suffix(".md").read_text().startswith("## ")
