"""Per-device memory and step time of the contrastive losses vs global batch: naive / gather / ring.

    python -m bench.loss_memory [--batches 1024,4096,16384,65536] [--dim 256] [--quick] [--out FILE]

Runs on 8 fake CPU devices (set before jax is imported). Memory is what XLA's compiled program reserves per
device for value_and_grad of the loss (temporaries + arguments + outputs, from `memory_analysis()`); it needs
no run, so it is reported for every size. Step time is measured where the whole program fits in host memory
(all 8 "devices" share this machine's RAM); the others read "-".
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bench.common import program_bytes, timed, write_results
from jaxmr import losses
from jaxmr.sharding import make_mesh

HOST_BUDGET = 6e9  # bytes all devices together may use for a timed run


def compile_loss(name: str, form: str, mesh, global_batch: int, dim: int):
    """value_and_grad of loss `name` in `form` ("naive": the single-device loss on the mesh's first device; a
    sharded form over the mesh) for float32 embeddings [global_batch, dim], compiled, not run: (compiled,
    input sharding, the loss's scalars, bytes per device, devices)."""
    scalars = (jnp.float32(10.0),) if name == "softmax" else (jnp.float32(10.0), jnp.float32(-10.0))
    if form == "naive":
        loss = losses.LOSSES[name]
        sharding = NamedSharding(jax.sharding.Mesh(mesh.devices.flat[:1], ("one",)), P())
    else:
        loss = losses.sharded_loss(name, mesh, form=form)
        sharding = NamedSharding(mesh, P("data"))
    argnums = tuple(range(2 + len(scalars)))
    fn = jax.jit(jax.value_and_grad(lambda *a: loss(*a)[0], argnums))
    spec = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=sharding)
    compiled = fn.lower(spec, spec, *scalars).compile()
    devices = 1 if form == "naive" else mesh.size
    return compiled, sharding, scalars, program_bytes(compiled), devices


def step_seconds(compiled, sharding, scalars, global_batch: int, dim: int, repeats: int) -> float:
    """Seconds per call of a `compile_loss` program on random embeddings."""
    key1, key2 = jax.random.split(jax.random.key(global_batch))
    x = jax.device_put(jax.random.normal(key1, (global_batch, dim)), sharding)
    y = jax.device_put(jax.random.normal(key2, (global_batch, dim)), sharding)
    return timed(lambda: jax.block_until_ready(compiled(x, y, *scalars)), repeats)


def measure(name: str, form: str, mesh, global_batch: int, dim: int, repeats: int) -> dict:
    compiled, sharding, scalars, per_device, devices = compile_loss(name, form, mesh, global_batch, dim)
    record = {"loss": name, "form": form, "global_batch": global_batch, "per_device_batch": global_batch // devices,
              "devices": devices, "per_device_mib": per_device / 2**20, "step_ms": "-"}  # fmt: skip
    if per_device * devices <= HOST_BUDGET:
        record["step_ms"] = 1000 * step_seconds(compiled, sharding, scalars, global_batch, dim, repeats)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1024,4096,16384,65536")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one small size: a smoke test")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    mesh = make_mesh([("data", 8)])
    sizes = [1024] if args.quick else [int(b) for b in args.batches.split(",")]
    records = []
    for name in ("softmax", "sigmoid"):
        for size in sizes:
            for form in ("naive", "gather", "ring"):
                record = measure(name, form, mesh, size, args.dim, args.repeats)
                print(record, flush=True)
                records.append(record)
    if not args.quick or args.out:
        notes = (
            "naive = the single-device loss on the whole global batch (B x B logits on one device); gather = each "
            "device scores its rows against all-gathered columns (b x B); ring = column blocks travel round the "
            f"ring, scored in [b, 256] tiles. Embedding dim {args.dim}, value_and_grad, 8 fake CPU devices on one "
            "host: step times are for comparing forms, not a prediction for real accelerators."
        )
        columns = ["loss", "form", "global_batch", "per_device_batch", "per_device_mib", "step_ms"]
        write_results("loss_memory", records, columns, "Loss memory and step time vs global batch", notes, args.out)


if __name__ == "__main__":
    main()
