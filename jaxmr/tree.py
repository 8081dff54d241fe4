"""Parameter trees as flat path dicts and back: what exports, checkpoint converters and freezing rules share."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}; leaves stay as they are (arrays, or ShapeDtypeStructs of an abstract model)."""
    flat = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """{"a/b/c": array} -> nested dict; path parts that are integers become int keys (nnx.List indices)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = [int(p) if p.isdigit() else p for p in path.split("/")]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def param_paths(params: dict) -> dict:
    """The same tree with each leaf replaced by its path string, e.g. 'image_tower/encoder/blocks/0/mlp/fc1/kernel'."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "/".join(str(getattr(k, "key", k)) for k in path), params)
