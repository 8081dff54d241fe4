"""Examples/s of the train step: jaxmr (Flax NNX, jit) vs the same model written plainly in PyTorch, in one run.

    python -m bench.train_throughput [--models tiny,s16] [--steps 6] [--quick] [--out FILE]

The model is the "tiny" preset (ViT d192x4 on 64x64, patch 8, mean pool + text Transformer d192x4, 32 tokens)
at batch 256, and the "s16" preset (ViT-S/16 at 224 + a 384-wide 12-layer text tower, 77 tokens) at batch 32,
both with AdamW and the CLIP softmax loss. Each side is warmed up (compilation, first allocations) before it
is timed; both run on the same cores, one after the other. On a GPU, jaxmr's model-FLOPs utilisation is
reported from XLA's own FLOP count of the compiled step.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from bench.common import peak_flops, write_results
from jaxmr.config import DataConfig, TrainConfig
from jaxmr.models import PRESETS, ModelConfig
from jaxmr.sharding import make_mesh
from jaxmr.training.step import build

BATCH = {"tiny": 256, "s16": 32}


def _batch(model: ModelConfig, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    size, length = model.image.image_size, model.text.max_len
    tokens = rng.integers(4, model.text.vocab_size, (batch, length)).astype(np.int32)
    tokens[:, length * 2 // 3 :] = 0
    return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), "text": tokens,
            "index": np.arange(batch, dtype=np.int32)}  # fmt: skip


def compile_step(model: ModelConfig, batch: int, devices=None):
    """(trainable, batch on the device, the compiled train step, compile seconds) for `model` at `batch` on one
    device (the first of `devices`, default JAX's), AdamW as a training run has it; the compiled step takes
    (state, batch) and donates the state."""
    config = TrainConfig(model=model, data=DataConfig(image_size=model.image.image_size, max_len=model.text.max_len),
                         batch_size=batch, mesh=(("data", 1),), steps=1000)  # fmt: skip
    trainable = build(config, make_mesh(config.mesh, devices=devices))
    data = {k: jax.device_put(v, trainable.batch_sharding) for k, v in _batch(model, batch).items()}
    start = time.perf_counter()
    compiled = trainable.step.lower(trainable.abstract_state(), data).compile()
    return trainable, data, compiled, time.perf_counter() - start


def step_flops(compiled) -> float | None:
    """XLA's own FLOP count of a compiled program (None where the backend gives none)."""
    try:
        cost = compiled.cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost or {}).get("flops", 0.0)) or None
    except Exception:
        return None


def time_steps(trainable, data, compiled, steps: int, warmup: int = 2) -> tuple[float, float]:
    """(seconds per step, last loss) of `steps` steps after `warmup` unmeasured ones, from a fresh state."""
    state = trainable.init()
    for _ in range(warmup):
        state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, data)
    loss = float(jax.block_until_ready(metrics)["loss"])
    return (time.perf_counter() - start) / steps, loss


def jaxmr_rate(model: ModelConfig, batch: int, steps: int) -> tuple[float, float | None]:
    trainable, data, compiled, _ = compile_step(model, batch)
    seconds, _ = time_steps(trainable, data, compiled, steps)
    flops = step_flops(compiled)
    return batch / seconds, (flops / seconds if flops else None)


def torch_steps(model: ModelConfig, batch: int, steps: int, device: str = "cpu", bf16: bool = False,
                compile: bool = False, warmup: int = 2) -> dict:  # fmt: skip
    """The same model, batch, optimizer (AdamW b2 0.98, weight decay 0.1, clip 1.0) and loss (float32) in
    PyTorch; on a GPU with `bf16` autocast, `compile` (torch.compile) and fused AdamW. Returns examples/s,
    step_ms, compile_s (the first step), loss and peak memory."""
    import torch

    from bench.torch_dual_encoder import TorchDualEncoder, clip_loss

    torch.manual_seed(0)
    net = TorchDualEncoder(model).to(device)
    fused = device == "cuda"
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.1, fused=fused)
    forward = torch.compile(net) if compile else net
    data = _batch(model, batch)
    images = torch.from_numpy(data["image"]).to(device).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    tokens = torch.from_numpy(data["text"]).long().to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

    def step() -> torch.Tensor:
        with autocast:
            zimg, ztxt, scale = forward(images, tokens)
        loss = clip_loss(zimg.float(), ztxt.float(), scale)  # in float32, as jaxmr's loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    step()
    sync()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    return {"batch": batch, "examples_per_s": batch / seconds, "step_ms": 1e3 * seconds, "compile_s": compile_s,
            "compiled": compile, "fused_adamw": fused, "loss": float(loss),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}  # fmt: skip


def torch_rate(model: ModelConfig, batch: int, steps: int) -> float:
    return torch_steps(model, batch, steps)["examples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,s16")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--quick", action="store_true", help="tiny only, 1 step, batch 16: a smoke test")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    names = ["tiny"] if args.quick else args.models.split(",")
    device = jax.devices()[0]
    records = []
    for name in names:
        model, batch = PRESETS[name], 16 if args.quick else BATCH[name]
        steps = 1 if args.quick else args.steps
        rate, flops_per_s = jaxmr_rate(model, batch, steps)
        record = {"model": name, "batch": batch, "device": device.device_kind, "jaxmr_examples_per_s": rate}
        if flops_per_s and device.platform == "gpu":
            peak = peak_flops(device.device_kind)
            record["jaxmr_mfu"] = flops_per_s / peak if peak else "-"
        if not args.no_torch and device.platform == "cpu":
            record["torch_examples_per_s"] = torch_rate(model, batch, steps)
            record["ratio_jaxmr_over_torch"] = rate / record["torch_examples_per_s"]
        print(record, flush=True)
        records.append(record)
    if not args.quick or args.out:
        columns = ["model", "batch", "device", "jaxmr_examples_per_s", "torch_examples_per_s",
                   "ratio_jaxmr_over_torch", "jaxmr_mfu"]  # fmt: skip
        write_results("train_throughput", records, columns, "Train step throughput, jaxmr vs plain PyTorch",
                      "Same architecture, batch, optimizer (AdamW, clip 1.0) and loss on both sides; fp32.",
                      args.out)  # fmt: skip


if __name__ == "__main__":
    main()
