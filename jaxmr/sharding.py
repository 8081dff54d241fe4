"""One mesh for everything: built from a config's axis list, e.g. [("data", -1)] or [("data", 2), ("fsdp", 4)]."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx


def make_mesh(axes: Sequence[tuple[str, int]] = (("data", -1),), devices=None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all); one axis size may be -1 to take the remaining devices.

    Fully specified axes that need fewer devices than there are take the first ones ([("data", 1)] runs on
    one device of eight), so a run can be pinned to fewer devices without listing them."""
    devices = list(devices if devices is not None else jax.devices())
    if -1 not in [size for _, size in axes]:
        needed = int(np.prod([size for _, size in axes]))
        if needed < len(devices):
            devices = devices[:needed]
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


# The one rules table: logical axis names (used by the models on parameters and activations) -> mesh axes.
# A mesh axis the mesh does not have is dropped, so the same table serves [("data", -1)] and data x fsdp.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),  # activations: the batch is split over every data-parallel axis
    ("embed", "fsdp"),  # parameters: FSDP shards the model width
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("vocab", None),
    ("length", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
)


def logical_to_spec(
    logical: Sequence[str | None] | None, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh, rules=LOGICAL_RULES
) -> jax.sharding.PartitionSpec:
    """Maps logical axis names to a PartitionSpec over `mesh` (unknown names and absent mesh axes -> None)."""
    if logical is None:
        return jax.sharding.PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.axis_names and a not in used and mesh.shape[a] > 1)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return jax.sharding.PartitionSpec(*spec)


def constrain(x: jax.Array, logical: Sequence[str | None], rules=LOGICAL_RULES) -> jax.Array:
    """Sharding constraint on an activation by logical names, under `jax.set_mesh`; a no-op without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, mesh, rules))


def param_shardings(state, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
    """NamedShardings for every nnx Variable in `state` from its logical `out_sharding` metadata."""

    def sharding(variable):
        logical = variable.get_metadata().get("out_sharding")
        return jax.sharding.NamedSharding(mesh, logical_to_spec(logical, mesh, rules))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_axes(mesh: jax.sharding.Mesh) -> str | tuple[str, ...]:
    """The mesh axes the batch is split over: what the rules table maps "batch" to, as far as the mesh has it
    (size-1 axes included: shard_map and the data sharding name them either way)."""
    target = dict(LOGICAL_RULES)["batch"]
    axes = tuple(a for a in ((target,) if isinstance(target, str) else target or ()) if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"the mesh needs a 'data' or 'fsdp' axis, has {mesh.axis_names}")
    return axes[0] if len(axes) == 1 else axes


def data_sharding(mesh: jax.sharding.Mesh, axes: str | tuple[str, ...] = "data") -> jax.sharding.NamedSharding:
    """Batch dimension split over `axes` of `mesh`, everything else replicated."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays sharded over the data axis."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
