"""Pretrained weights into jaxmr models: a checked builder for converting torch-layout state dicts, strict
merging of converted parameter trees, and the towers' loaders."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxmr.export import flatten, unflatten


class ConversionError(ValueError):
    """A checkpoint a converter does not understand."""


class TorchState:
    """Converts a torch-layout state dict into our nested params, checking that every tensor is used.

    `take` reads a tensor (marking it used), `put` places a value at a "a/b/0/c" path; `linear`, `norm` and
    `attention` do the layout changes (torch Linear weights are [out, in], ours [in, out]; attention kernels are
    split into heads). `params` is the nested dict, `check_all_used` fails on tensors no rule consumed."""

    def __init__(self, state: dict[str, np.ndarray]):
        self.state = {k: np.asarray(v, np.float32) for k, v in state.items()}
        self.used: set[str] = set()
        self.flat: dict[str, np.ndarray] = {}

    @property
    def params(self) -> dict:
        return unflatten(self.flat)

    def take(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise ConversionError(f"the checkpoint has no tensor {key!r}")
        self.used.add(key)
        return self.state[key]

    def put(self, path: str, value: np.ndarray) -> None:
        self.flat[path] = np.array(value, np.float32)  # a copy; keeps 0-d scalars 0-d (unlike ascontiguousarray)

    def linear(self, path: str, key: str, bias: bool = True) -> None:
        self.put(f"{path}/kernel", self.take(f"{key}.weight").T)
        if bias:
            self.put(f"{path}/bias", self.take(f"{key}.bias"))

    def norm(self, path: str, key: str) -> None:
        self.put(f"{path}/scale", self.take(f"{key}.weight"))
        self.put(f"{path}/bias", self.take(f"{key}.bias"))

    def attention(self, path: str, q: tuple, k: tuple, v: tuple, out: str, heads: int) -> None:
        """q, k, v: (weight [D, D], bias [D]) in torch layout; out: the output projection's key prefix."""
        width = q[0].shape[1]
        head_dim = width // heads
        for name, (w, b) in (("query", q), ("key", k), ("value", v)):
            self.put(f"{path}/{name}/kernel", w.T.reshape(width, heads, head_dim))
            self.put(f"{path}/{name}/bias", b.reshape(heads, head_dim))
        self.put(f"{path}/out/kernel", self.take(f"{out}.weight").T.reshape(heads, head_dim, -1))
        self.put(f"{path}/out/bias", self.take(f"{out}.bias"))

    def check_all_used(self, ignore: str = r"$^") -> None:
        unused = sorted(k for k in self.state if k not in self.used and not re.fullmatch(ignore, k))
        if unused:
            raise ConversionError(f"{len(unused)} checkpoint tensors have no place in the model: {unused[:5]}")


def merge_strict(params: dict, loaded: dict, where: str = "") -> dict:
    """`params` with every leaf replaced by the one at the same path in `loaded`.

    Both trees must have exactly the same paths and shapes: a weight missing from the checkpoint, one the model
    has no place for, or a shape mismatch is a ValueError naming the paths (no silent partial loads).
    """
    have, new = flatten(params), flatten(loaded)
    show = lambda paths: ", ".join(sorted(paths)[:5])
    if missing := have.keys() - new.keys():
        raise ValueError(f"{where}: the checkpoint has no value for {len(missing)} parameters: {show(missing)}")
    if extra := new.keys() - have.keys():
        raise ValueError(f"{where}: the model has no place for {len(extra)} checkpoint tensors: {show(extra)}")
    for path, value in new.items():
        if tuple(np.shape(value)) != tuple(np.shape(have[path])):
            raise ValueError(
                f"{where}: {path} has shape {np.shape(value)} in the checkpoint, {np.shape(have[path])} in the model"
            )
    return unflatten({path: np.asarray(value, getattr(have[path], "dtype", np.float32)) for path, value in new.items()})


def has_pretrained_towers(model_config: Any) -> bool:
    """Whether the model config names pretrained weights for either tower."""
    return any(getattr(tower, "weights", "") for tower in (model_config.image, model_config.text))


def tower_weights(config: Any) -> dict | None:
    """The pretrained parameters a tower config names (None when it asks for random initialisation)."""
    from jaxmr.models.bert import BertConfig
    from jaxmr.models.bert import pretrained_params as bert_params
    from jaxmr.models.efficientnet import EfficientNetConfig
    from jaxmr.models.efficientnet import pretrained_params as efficientnet_params

    if isinstance(config, EfficientNetConfig) and config.weights:
        return efficientnet_params(config)
    if isinstance(config, BertConfig) and config.weights:
        return bert_params(config)
    return None


def load_pretrained_towers(model_config: Any, params: dict) -> tuple[dict, list[str]]:
    """`params` (a DualEncoder's pure dict) with the pretrained towers its config names filled in.
    Returns (params, names of the towers loaded)."""
    params = dict(params)
    loaded = []
    for name, tower in (("image_tower", model_config.image), ("text_tower", model_config.text)):
        weights = tower_weights(tower)
        if weights is not None:
            params[name] = merge_strict(params[name], weights, f"{name} ({type(tower).__name__})")
            loaded.append(name)
    return params, loaded
