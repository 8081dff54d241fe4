"""The on-disk model format: what a server or an index build needs of a trained model, without the training run.

An export is a directory:

    config.json        the run's TrainConfig, the image size, the step and the model fingerprint
    params.npz         every parameter by its path ("image_tower/encoder/blocks/0/mlp/fc1/kernel")
    tokenizer/         the run's tokenizer
    composer/          optional: a trained composed-query model (params.npz, config.json; `jaxmr.training.composed`)

Runs become exports through `jaxmr.training.exports.export_model`; CLIP/SigLIP checkpoints through `jaxmr.convert`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxmr.config import TrainConfig, from_dict, to_dict
from jaxmr.files import atomic_dir
from jaxmr.models import Composer
from jaxmr.text import Tokenizer, load_tokenizer
from jaxmr.tree import flatten, unflatten

EXPORT_FORMAT = 1
COMPOSER_DIR = "composer"


class ModelMismatchError(ValueError):
    """An index and a model that do not belong together."""


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is a model export (else it may be a training run): the one test every command uses."""
    return (Path(path) / "params.npz").is_file()


def fingerprint(params: dict, config: TrainConfig) -> str:
    """sha256 of the model config and every parameter's name, dtype, shape and bytes (first 16 hex digits)."""
    digest = hashlib.sha256(json.dumps(to_dict(config.model), sort_keys=True).encode())
    for path, value in sorted(flatten(params).items()):
        value = np.ascontiguousarray(value)
        digest.update(f"{path}:{value.dtype}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


def write_export(out: str | os.PathLike, config: TrainConfig, params: dict, tokenizer: Tokenizer, step: int,
                 **origin: str) -> str:  # fmt: skip
    """Writes an export directory for `params` of `config`'s model; returns its fingerprint. `origin` is recorded
    (the run's workdir, or the checkpoint a model was imported from).

    Written to a temporary sibling and renamed into place, so `out` is either the old export or the new one."""
    with atomic_dir(out) as tmp:
        np.savez(tmp / "params.npz", **flatten(params))
        tokenizer.save(tmp / "tokenizer")
        meta = {
            "format": EXPORT_FORMAT,
            "fingerprint": fingerprint(params, config),
            "step": step,
            "image_size": config.data.image_size,
            **origin,
            "config": to_dict(config),
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta["fingerprint"]


def read_export_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "params.npz").is_file():
        raise FileNotFoundError(f"{path} is not a model export (needs config.json and params.npz)")
    meta = json.loads((path / "config.json").read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: export format {meta.get('format')!r}, this jaxmr reads {EXPORT_FORMAT}")
    return meta


def load_export(path: str | os.PathLike) -> tuple[TrainConfig, dict, Tokenizer, dict[str, Any]]:
    """(config, params as a nested dict of numpy arrays, tokenizer, meta) of an export directory."""
    path = Path(path)
    meta = read_export_meta(path)
    with np.load(path / "params.npz") as data:
        params = unflatten({k: data[k] for k in data.files})
    return from_dict(meta["config"]), params, load_tokenizer(path / "tokenizer"), meta


def load_composer(export: str | Path, model_config) -> tuple[nnx.GraphDef, dict] | None:
    """(graphdef, params) of an export's composer, or None when it has none."""
    path = Path(export) / COMPOSER_DIR
    if not (path / "params.npz").is_file():
        return None
    meta = json.loads((path / "config.json").read_text())
    abstract = nnx.eval_shape(lambda: Composer(model_config, meta["hidden"], rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    with np.load(path / "params.npz") as f:
        params = unflatten(dict(f))
    if jax.tree.structure(nnx.to_pure_dict(state)) != jax.tree.structure(params):
        raise ValueError(f"{path}: the composer's parameters do not match its config")
    return graphdef, params
