"""Pretrained weights into jaxmr models: strict merging of converted parameter trees, and the towers' loaders."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


def flatten(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def merge_strict(params: dict, loaded: dict, where: str = "") -> dict:
    """`params` with every leaf replaced by the one at the same path in `loaded`.

    Both trees must have exactly the same paths and shapes: a weight missing from the checkpoint, one the model
    has no place for, or a shape mismatch is a ValueError naming the paths (no silent partial loads).
    """
    have = dict(flatten(params))
    new = dict(flatten(loaded))
    show = lambda paths: ", ".join("/".join(map(str, p)) for p in sorted(paths, key=str)[:5])
    if missing := have.keys() - new.keys():
        raise ValueError(f"{where}: the checkpoint has no value for {len(missing)} parameters: {show(missing)}")
    if extra := new.keys() - have.keys():
        raise ValueError(f"{where}: the model has no place for {len(extra)} checkpoint tensors: {show(extra)}")
    for path, value in new.items():
        if tuple(np.shape(value)) != tuple(np.shape(have[path])):
            raise ValueError(
                f"{where}: {'/'.join(map(str, path))} has shape {np.shape(value)} in the checkpoint, "
                f"{np.shape(have[path])} in the model"
            )
    out: dict = {}
    for path, value in new.items():
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.asarray(value, getattr(have[path], "dtype", np.float32))
    return out


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
