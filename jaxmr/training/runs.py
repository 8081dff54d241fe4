"""Dual-encoder runs as models: restoring a run's checkpoint, evaluating it, exporting it, its serving encoder,
and "run or export?" for every command that takes either. Composed runs are exported by `jaxmr.training.exports`."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from jaxmr import distributed
from jaxmr.config import TrainConfig, read_config_json
from jaxmr.data import parse_source
from jaxmr.encoder import Encoder
from jaxmr.evaluators import Retrieval
from jaxmr.export import fingerprint, is_export, read_export_meta, write_export
from jaxmr.sharding import make_mesh
from jaxmr.text import Tokenizer, load_tokenizer
from jaxmr.training.checkpoints import Checkpoints
from jaxmr.training.evaluators import TrainEmbedder
from jaxmr.training.step import Trainable, TrainState, build


def load_run(workdir: str | Path, step: int | None = None) -> tuple[TrainConfig, Trainable, TrainState, Tokenizer]:
    """A finished (or interrupted) run: its config, jitted functions, restored state and tokenizer."""
    workdir = Path(workdir)
    if not (workdir / "config.json").exists():
        raise ValueError(f"{workdir} is not a training run (no config.json)")
    config = read_config_json(workdir / "config.json")
    trainable = build(config, make_mesh(config.mesh))
    checkpoints = Checkpoints(workdir / "checkpoints", config.keep_checkpoints, config.best_metric)
    if checkpoints.latest_step() is None:
        raise ValueError(f"{workdir} has no checkpoint yet")
    state, _ = checkpoints.restore(trainable.abstract_state(), step, data=False)
    checkpoints.close()
    return config, trainable, state, load_tokenizer(workdir / "tokenizer")


def evaluate(workdir: str | Path, source_spec: str | None = None, split: str | None = None) -> dict[str, float]:
    """Recall@K of a run's latest checkpoint on its own eval split or on any source and split."""
    config, trainable, state, tokenizer = load_run(workdir)
    source = parse_source(source_spec or config.data.source, split or config.data.eval_split)
    with jax.set_mesh(trainable.mesh):
        return Retrieval(source)(TrainEmbedder(trainable, tokenizer, state.params))


def export_run(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> str:
    """Writes a dual-encoder run's latest (or `step`) checkpoint as an export directory; returns its fingerprint.

    In a multi-process run every process calls this (the checkpoint is restored collectively) and process 0
    writes; the others return ""."""
    config, _, state, tokenizer = load_run(workdir, step)
    params = distributed.to_host(state.params)
    if not distributed.is_primary():
        return ""
    return write_export(out, config, params, tokenizer, int(state.step), workdir=str(Path(workdir).resolve()))


def run_encoder(workdir: str | os.PathLike, step: int | None = None) -> Encoder:
    """The serving `Encoder` of a run's latest (or `step`) checkpoint, without writing an export."""
    config, _, state, tokenizer = load_run(workdir, step)
    params = jax.tree.map(np.asarray, state.params)
    return Encoder(config, params, tokenizer, fingerprint(params, config))


def load_encoder(path: str | os.PathLike) -> Encoder:
    """The model of a model export or of a dual-encoder training run: "run or export?" answered once."""
    path = Path(path)
    if is_export(path):
        return Encoder.load(path)
    if (path / "config.json").is_file():
        return run_encoder(path)
    raise ValueError(f"{path}: neither a model export nor a training run (train one first, e.g. "
                     "`jaxmr train --config configs/shapes_tiny.py --workdir runs/shapes_tiny`)")  # fmt: skip


def model_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint of an export (read from its metadata) or of a run's latest checkpoint."""
    if is_export(path):
        return read_export_meta(path)["fingerprint"]
    encoder = run_encoder(path)
    return fingerprint(encoder.params, encoder.config)
