"""Multi-process training and index building: 2 processes x 4 fake CPU devices on localhost (gloo collectives)
against the one-process 8-device run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxmr.cli import main as cli
from jaxmr.config import load_config_file
from jaxmr.index.build import BuildOptions, build_index
from jaxmr.training.checkpoints import read_metrics
from jaxmr.training.loop import train
from jaxmr.training.runs import evaluate, load_run

from conftest import ROOT, SMOKE_SOURCE, write_shards

SMOKE = str(ROOT / "configs" / "shapes_tiny.py") + ":smoke"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _together(argv: list[str], processes: int = 2, devices: int = 4, timeout: float = 600) -> list[str]:
    """Runs `jaxmr ARGV` as `processes` cooperating processes of `devices` CPU devices each; their stdouts.

    stderr is kept apart (shown on failure). gloo's C++ threads write "[Gloo] Rank 0 is connected ..." to file
    descriptor 1 whenever they get to it (once cutting a command's last line in two): jaxmr.distributed sends that
    descriptor to stderr, and this checks it."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")

    def launch(i: int) -> list[str]:  # one process: no flags, the plain command
        flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]
        return [sys.executable, "-m", "jaxmr.cli", *argv, *(flags if processes > 1 else [])]

    running = [
        subprocess.Popen(launch(i), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(processes)
    ]
    outputs = []
    try:
        for process in running:
            outputs.append(process.communicate(timeout=timeout))
    finally:
        for process in running:
            process.kill()
    for process, (out, err) in zip(running, outputs, strict=True):
        assert process.returncode == 0, (out + err)[-3000:]
        assert "[Gloo]" not in out, "gloo's lines belong on stderr, apart from the command's output"
    return [out for out, _ in outputs]


def _losses(workdir: Path) -> list[float]:
    return [m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m]


def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(tmp_path):
    overrides = ",steps=4,eval_every=4,checkpoint_every=2"
    single = train(load_config_file(SMOKE + overrides), tmp_path / "one", progress=False)  # 8 devices, one process
    outputs = _together(["train", "--config", SMOKE + overrides, "--workdir", str(tmp_path / "two"), "--no-progress"])
    assert '"t2i_r1":' in outputs[0] and '"t2i_r1":' not in outputs[1]  # process 0 prints the final JSON
    # the same global batches (each process reads its rows of each), the same loss over 8 devices
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=2e-4)
    assert len(_losses(tmp_path / "two")) == 4
    # written collectively by orbax, restored here by one process (on 8 devices), evaluated alike
    _, _, state, _ = load_run(tmp_path / "two")
    assert int(state.step) == 4
    restored = evaluate(tmp_path / "two")
    for key in ("t2i_r1", "t2i_r5", "i2t_r1"):
        assert restored[key] == pytest.approx(single[key], abs=0.02)
    two = [m for m in read_metrics(tmp_path / "two") if "eval/t2i_r1" in m][-1]
    assert two["eval/t2i_r1"] == pytest.approx(restored["t2i_r1"], abs=1e-6)


def test_two_process_index_build_equals_one_process_build(smoke_run, tmp_path):
    """Bit for bit against one process on as many devices per process (4: the same per-device batches); a
    one-process build on 8 devices differs only in float16 rounding of a few values."""
    argv = ["index", "build", "--workdir", str(smoke_run), "--source", SMOKE_SOURCE, "--split", "all", "--chunk",
            "64", "--batch-size", "32", "--no-progress"]  # fmt: skip
    _together([*argv, "--out", str(tmp_path / "two")])
    _together([*argv, "--out", str(tmp_path / "one")], processes=1)
    build_index(smoke_run, SMOKE_SOURCE, tmp_path / "eight", "all", BuildOptions(chunk=64, batch_size=32),
                progress=False)  # fmt: skip
    one, two = tmp_path / "one" / "current", tmp_path / "two" / "current"
    for name in ("images/ids.npy", "captions/ids.npy", "images/embeddings.npy", "captions/embeddings.npy"):
        np.testing.assert_array_equal(np.load(two / name), np.load(one / name), err_msg=name)
        eight = np.load(tmp_path / "eight" / "current" / name).astype(np.float32)
        # Stored as float16: float32 values ~1e-6 apart can round to neighbouring float16 values, one step apart:
        # 2^-11 for a unit vector's components in [0.5, 1) (2e-4 was less than the step of 2^-12 at 0.33 and
        # failed under jax 0.11). More than one step would be a real difference.
        np.testing.assert_allclose(np.load(two / name).astype(np.float32), eight, atol=2**-11 + 1e-6, err_msg=name)
    import pyarrow.parquet as pq

    for name in ("images/meta.parquet", "captions/meta.parquet"):
        assert pq.read_table(two / name).equals(pq.read_table(one / name)), name
    assert not (tmp_path / "two" / ".build").exists()
    assert cli(["index", "search", str(tmp_path / "two"), "a red circle", "-k", "3"]) == 0


def test_two_process_knn_holds_half_the_index_each_and_equals_one_process(smoke_run, tmp_path):
    """`jaxmr index knn` as 2 processes x 4 CPU devices (gloo): each process holds and reads half of the index's
    rows, and the pairs written equal those of one process on 8 devices."""
    import json

    import pyarrow.parquet as pq

    from jaxmr.index.ann import AnnConfig
    from jaxmr.index.build import write_index

    vectors = np.random.default_rng(0).normal(size=(3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_index(tmp_path / "index", smoke_run, vectors, ann=AnnConfig(method="brute_force"), dtype="float32")
    np.save(tmp_path / "q.npy", vectors[:200] + 0.05)
    argv = ["index", "knn", str(tmp_path / "index"), "--queries", str(tmp_path / "q.npy"), "-k", "10", "--dtype",
            "float32", "--batch", "64", "--json", "--no-progress"]  # fmt: skip
    two = _together([*argv, "--out", str(tmp_path / "two.parquet")])
    _together([*argv, "--out", str(tmp_path / "one.parquet")], processes=1, devices=8)
    summaries = [json.loads(out.strip().splitlines()[-1]) for out in two]
    assert sorted(s["process"] for s in summaries) == [0, 1]
    for s in summaries:
        half = s["capacity"] // 2  # slots 0..half-1 on process 0's 4 devices, the rest on process 1's
        assert s["processes"] == 2 and s["devices"] == 8 and s["rows_this_process"] == half
        assert s["vectors_read"] == min(max(3000 - s["process"] * half, 0), half)  # its own shards' rows only
    one, pairs = pq.read_table(tmp_path / "one.parquet"), pq.read_table(tmp_path / "two.parquet")
    assert pairs.num_rows == one.num_rows == 2000
    for name in ("query", "neighbor", "rank"):
        np.testing.assert_array_equal(pairs[name].to_numpy(), one[name].to_numpy())
    np.testing.assert_allclose(pairs["score"].to_numpy(), one["score"].to_numpy(), rtol=1e-6, atol=1e-6)


def test_bad_launch_flags_are_clear_errors(tmp_path, capsys):
    argv = ["train", "--config", SMOKE, "--workdir", str(tmp_path / "w"), "--no-progress"]
    assert cli([*argv, "--coordinator", "127.0.0.1:1234"]) == 2
    assert "together" in capsys.readouterr().err
    assert cli([*argv, "--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"]) == 2
    assert "0..1" in capsys.readouterr().err
    assert cli([*argv, "--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["stream", "resampled", "random"])
def test_two_processes_stopped_and_resumed_each_from_its_own_position_equal_a_run_through(mode, tmp_path, capsys):
    """2 processes x 4 devices on `wds:` shards, stopped at step 2 and resumed: the losses after it equal an
    uninterrupted 2-process run's, each process wrote and read back its own data position (before, every process
    resumed from process 0's), and a restart with another process count is refused with one clear error."""
    write_shards(tmp_path / "wds", shards=4, per_shard=24)
    overrides = (f",data.source=wds:{tmp_path / 'wds'},data.image_size=32,steps=4,eval_every=100,"
                 "checkpoint_every=100,log_every=1,data.read_threads=1")  # fmt: skip
    if mode != "random":
        overrides += ",data.stream_buffer=8" + (",data.resampled=True" if mode == "resampled" else "")
    else:
        overrides += ",data.train_split=all,data.eval_split=all"
    run = ["train", "--config", SMOKE + overrides, "--no-progress", "--workdir"]
    _together([*run, str(tmp_path / "stopped"), "--stop-at-step", "2"])
    saved = [json.loads((tmp_path / "stopped" / "data_state" / "step_2" / f"process-{p}-of-2.json").read_text())
             for p in (0, 1)]  # fmt: skip
    if mode == "random":  # each past its 2 x 8 rows, plus the unreadable images it met (process 0's rows hold
        # one here: 17 against 16; resumed from process 0's state, process 1 used to skip a sample)
        assert all(s["grain"]["next_index"] >= 16 for s in saved) and saved[0] != saved[1]
    else:  # each process's own shards, buffer and RNG
        assert [s["process"] for s in saved] == [0, 1] and saved[0]["rng"] != saved[1]["rng"]
        if mode == "stream":  # disjoint shards: no buffered sample of one is the other's
            assert not {r[0] for r in saved[0]["buffer"]} & {r[0] for r in saved[1]["buffer"]}
    _together([*run, str(tmp_path / "stopped")])
    _together([*run, str(tmp_path / "through")])
    stopped, through = _losses(tmp_path / "stopped"), _losses(tmp_path / "through")
    assert len(stopped) == 4  # the same programs on the same batches in the same order: equal to rounding
    np.testing.assert_allclose(stopped, through, rtol=1e-6)
    # one process cannot take up two processes' positions: one clear error, no traceback, nothing written
    before = sorted(p.name for p in (tmp_path / "through" / "checkpoints").iterdir())
    capsys.readouterr()
    assert cli([*run, str(tmp_path / "through"), "--stop-at-step", "6"]) == 2
    err = capsys.readouterr().err
    assert "written by 2 processes and this run has 1" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "through" / "checkpoints").iterdir()) == before
