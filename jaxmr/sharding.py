"""One mesh for everything: built from a config's axis list, e.g. [("data", -1)] or [("data", 2), ("fsdp", 4)]."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np


def make_mesh(axes: Sequence[tuple[str, int]] = (("data", -1),), devices=None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all); one axis size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    names = tuple(name for name, _ in axes)
    sizes = [size for _, size in axes]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {list(axes)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh axes {list(axes)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh axes {list(axes)} need {int(np.prod(sizes))} devices, have {len(devices)}")
    return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), names)
