import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmr.cli import main as cli
from jaxmr.config import TrainConfig, from_dict, load_config_file, override, to_dict
from jaxmr.sharding import make_mesh
from jaxmr.training.checkpoints import read_metrics
from jaxmr.training.loop import train
from jaxmr.training.runs import load_run
from jaxmr.training.step import build, compute_grads, make_loss

from conftest import ROOT, assert_close_in_norm

SMOKE = str(ROOT / "configs" / "shapes_tiny.py") + ":smoke"


def smoke(**changes) -> TrainConfig:
    return dataclasses.replace(load_config_file(SMOKE), **changes)


# ------------------------------------------------------------------------------------------------ configs


def test_overrides_are_typed_and_typos_fail():
    config = load_config_file(SMOKE + ",optim.lr=0.01,data.source=captions:/x/y,data.crop_scale=(0.5, 1.0)")
    assert config.optim.lr == 0.01 and config.data.source == "captions:/x/y" and config.data.crop_scale == (0.5, 1.0)
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.learning_rate'"):
        override(config, "optim.learning_rate", "1")
    with pytest.raises(ValueError, match="is a int"):
        override(config, "steps", "many")
    with pytest.raises(ValueError, match="not key=value"):
        load_config_file(SMOKE + ",steps")
    with pytest.raises(ValueError, match="knows the variant 'smoke'"):
        load_config_file(str(ROOT / "configs" / "shapes_tiny.py") + ":huge")
    assert override(config, "optim.lr", "1").optim.lr == 1.0  # an int is fine for a float


def test_config_json_round_trip():
    config = load_config_file(str(ROOT / "configs" / "shapes_tiny.py"))
    assert from_dict(json.loads(json.dumps(to_dict(config)))) == config


# ------------------------------------------------------------------------------------------------- steps


def _batch(config, n, seed=0):
    rng = np.random.default_rng(seed)
    size, length = config.data.image_size, config.data.max_len
    tokens = rng.integers(4, 500, (n, length)).astype(np.int32)
    tokens[:, 20:] = 0
    return {
        "image": jnp.asarray(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)),
        "text": jnp.asarray(tokens),
        "index": jnp.asarray(np.arange(n) // 2, jnp.int32),  # pairs of captions of one image: multi-positive
    }


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_grad_cache_equals_full_batch_gradient(loss):
    config = smoke(loss=dataclasses.replace(smoke().loss, name=loss))
    mesh = make_mesh([("data", 1)])
    trainable = build(config, mesh)
    params = trainable.init().params
    batch = _batch(config, 16)
    loss_fn = make_loss(config.loss, mesh)
    full = jax.jit(lambda p, b: compute_grads(trainable.graphdef, loss_fn, p, b, 1))(params, batch)
    cached = jax.jit(lambda p, b: compute_grads(trainable.graphdef, loss_fn, p, b, 4))(params, batch)
    np.testing.assert_allclose(full[0], cached[0], rtol=1e-5)  # a float32 mean of 16 rows' losses
    assert_close_in_norm(full[3], cached[3])
    assert float(jnp.abs(cached[3]["log_t"])) > 0


def test_k_captions_per_image_embed_each_image_once():
    # text [n, k, L]: the same loss and gradient as the n * k rows of (image repeated, caption) it stands for
    config = smoke()
    mesh = make_mesh([("data", 1)])
    trainable = build(config, mesh)
    params = trainable.init().params
    flat = _batch(config, 16)  # rows 2i and 2i + 1: two captions of image i
    flat["image"] = jnp.repeat(flat["image"][::2], 2, axis=0)
    grouped = {"image": flat["image"][::2], "text": flat["text"].reshape(8, 2, -1), "index": flat["index"][::2]}
    loss_fn = make_loss(config.loss, mesh)
    want = jax.jit(lambda p, b: compute_grads(trainable.graphdef, loss_fn, p, b, 1))(params, flat)
    for accum in (1, 4):  # and GradCache over 4 micro-batches of 2 images / 4 captions
        got = jax.jit(lambda p, b, a=accum: compute_grads(trainable.graphdef, loss_fn, p, b, a))(params, grouped)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)  # a float32 mean of 16 rows' losses
        assert float(got[1]["t2i_acc"]) == float(want[1]["t2i_acc"])
        assert_close_in_norm(want[3], got[3])
    with pytest.raises(ValueError, match="grad_accum=4 micro-batches"):
        smoke(batch_size=12, captions_per_image=2, grad_accum=4)  # 6 images
    mesh8 = make_mesh([("data", 8)])
    with pytest.raises(ValueError, match=r"batch_size / captions_per_image / grad_accum = 4 does not split over the 8"):
        build(smoke(batch_size=8, captions_per_image=2, eval_batch_size=8), mesh8)  # 8 captions, 4 images
    with pytest.raises(ValueError, match=r"^batch_size = 12 does not split over the 8"):
        build(smoke(batch_size=12, eval_batch_size=8), mesh8)


def test_freezing_by_regex_and_clear_errors():
    config = smoke(optim=dataclasses.replace(smoke().optim, freeze=("image_tower/.*",)))
    trainable = build(config, make_mesh([("data", 1)]))
    state = trainable.init()
    before = jax.device_get(state.params)
    for seed in range(2):  # the first step's learning rate is 0 (warmup starts there)
        state, _ = trainable.step(state, _batch(config, 16, seed))
    after = jax.device_get(state.params)
    for a, b in zip(jax.tree.leaves(before["image_tower"]), jax.tree.leaves(after["image_tower"]), strict=True):
        np.testing.assert_array_equal(a, b)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(before["text_tower"]), jax.tree.leaves(after["text_tower"]), strict=True)
    ]
    assert all(changed)
    with pytest.raises(ValueError, match="matches no parameter"):
        build(smoke(optim=dataclasses.replace(smoke().optim, freeze=("vision/.*",))), make_mesh([("data", 1)]))


# ------------------------------------------------------------------------------------------- whole runs


def _params(workdir):
    return jax.device_get(load_run(workdir)[2].params)


def _tensorboard_events(workdir: Path) -> list:
    """Every event of the run's TensorBoard files (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            length = int.from_bytes(data[at : at + 8], "little")
            events.append(Event.FromString(data[at + 12 : at + 12 + length]))
            at += 12 + length + 4
    return events


def test_exact_resume_after_a_lost_checkpoint_records_each_step_once(tmp_path):
    """Straight vs resumed: the resumed run logged steps 4-5 after its checkpoint at 3, then died before its
    checkpoint at 5 was complete (and cut a line short). It resumes from 3 to bitwise-identical parameters and
    losses, and records 4-6 once: metrics.jsonl is cut back to step 3, TensorBoard purges from step 4."""
    import shutil

    config = smoke()  # 6 steps, checkpoints every 3
    train(config, tmp_path / "straight", progress=False)
    resumed = tmp_path / "resumed"
    train(config, resumed, stop_at_step=5, progress=False)
    assert [m["step"] for m in read_metrics(resumed) if "train/loss" in m] == [1, 2, 3, 4, 5]
    shutil.rmtree(resumed / "checkpoints" / "5")
    with (resumed / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "train/lo')
    train(config, resumed, progress=False)
    assert [m["step"] for m in read_metrics(resumed) if "train/loss" in m] == [1, 2, 3, 4, 5, 6]
    assert all(line.startswith('{"step"') for line in (resumed / "metrics.jsonl").read_text().splitlines())
    starts = [e.step for e in _tensorboard_events(resumed) if e.HasField("session_log") and e.session_log.status == 1]
    assert starts[-1] == 4  # SessionLog.START at 4: TensorBoard drops the first run's events from step 4 on
    for a, b in zip(
        jax.tree.leaves(_params(tmp_path / "straight")), jax.tree.leaves(_params(tmp_path / "resumed")), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    losses = lambda d: [m["train/loss"] for m in read_metrics(d) if "train/loss" in m]
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


@pytest.mark.parametrize("captions", [1, 2])
def test_sharded_run_matches_single_device(tmp_path, captions):
    config = smoke(steps=3, captions_per_image=captions)
    single = train(dataclasses.replace(config, mesh=(("data", 1),)), tmp_path / "one", progress=False)
    sharded = train(dataclasses.replace(config, mesh=(("data", 8),)), tmp_path / "eight", progress=False)
    one = [m["train/loss"] for m in read_metrics(tmp_path / "one") if "train/loss" in m]
    eight = [m["train/loss"] for m in read_metrics(tmp_path / "eight") if "train/loss" in m]
    np.testing.assert_allclose(one, eight, rtol=2e-4)
    assert single["t2i_r1"] == pytest.approx(sharded["t2i_r1"], abs=0.02)


def test_run_outputs_and_eval_cli(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli(["train", "--config", SMOKE, "--workdir", str(workdir), "--no-progress"]) == 0
    records = read_metrics(workdir)
    assert {m["step"] for m in records if "eval/t2i_r1" in m} == {3, 6}
    for m in (m for m in records if "train/loss" in m):  # where each logging window's time went
        assert m["train/examples_per_s"] * m["train/step_s"] == pytest.approx(16, rel=1e-6)  # batch 16
        assert 0 <= m["train/data_wait_s"] <= m["train/step_s"]
        assert m["train/data_wait_share"] == pytest.approx(m["train/data_wait_s"] / m["train/step_s"], rel=1e-6)
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["__type__"] == "TrainConfig"
    capsys.readouterr()
    assert cli(["eval", "--workdir", str(workdir), "--split", "test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_median_rank",
                           "i2t_median_rank", "n_images", "n_captions"}  # fmt: skip
    assert (result["n_images"], result["n_captions"]) == (64, 320)
    assert 0 <= result["t2i_r1"] <= result["t2i_r5"] <= result["t2i_r10"] <= 1
    # a different config in the same workdir is refused, not silently mixed
    assert cli(["train", "--config", SMOKE + ",seed=1", "--workdir", str(workdir), "--no-progress"]) == 2
    assert "different config" in capsys.readouterr().err
    assert cli(["eval", "--workdir", str(tmp_path / "nothing")]) == 2


def _start(workdir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "train.main", "--config", SMOKE + ",steps=40,checkpoint_every=1,eval_every=100",
               "--workdir", str(workdir), "--no-progress", *extra]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "XLA_FLAGS": ""})  # fmt: skip


def _wait_for_step(workdir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(m.get("step", 0) >= step for m in read_metrics(workdir)):
            return
        if process.poll() is not None:
            raise AssertionError(process.stdout.read())
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_sigkill_during_async_checkpoint_then_resume(tmp_path):
    """Killed while checkpoints are written every step: the restart resumes from the last complete one."""
    workdir = tmp_path / "run"
    process = _start(workdir)
    _wait_for_step(workdir, 6, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = _start(workdir)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "resumed from step" in output and "Traceback" not in output
    steps = [m["step"] for m in read_metrics(workdir) if "train/loss" in m]
    assert steps == list(range(1, 41))  # nothing missing after the restart, nothing recorded twice


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "run"
    process = _start(workdir)
    _wait_for_step(workdir, 4, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    _, _, state, _ = load_run(workdir)
    last_logged = max(m["step"] for m in read_metrics(workdir) if "train/loss" in m)
    assert int(state.step) == last_logged < 40
