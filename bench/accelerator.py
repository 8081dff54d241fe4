"""One command for an accelerator: the train step against PyTorch, the losses' memory, exact search on the device
against ScaNN, the input pipeline and the server, in one run, written to bench/results/accelerator-<device>.*

    python -m bench.accelerator [--budget 450] [--only train,search,...]   # on the GPU machine: make bench-accel
    python -m bench.accelerator --quick [--out DIR]                        # the CPU dry run (tests/test_bench.py)

Each section runs in its own process (`--child`), so JAX and PyTorch each find the device's memory free, an
out-of-memory or a crash costs one section, and a section that overruns is stopped at its time limit while the
records it already wrote are kept. Sections run in order of importance until `--budget` seconds are spent:

  probe   the device, its memory, a bf16 matmul's TFLOP/s and a copy's bandwidth (the ceilings), versions
  train   the `b16` preset at 224 px in bf16 (then `s16`): the largest batch that fits without GradCache (from
          the compiled step's memory), examples/s, step time, MFU (XLA's FLOP count of the compiled step over
          the datasheet's dense bf16 peak), peak memory; then the same model, batch, optimizer and loss in
          PyTorch (bf16 autocast, torch.compile, fused AdamW) in the next process
  search  exact search on the device (bf16, matmul + lax.top_k; and lax.approx_max_k) at 1M and 10M x 256:
          one query's p50/p99, QPS at batch 32 and 1024, recall@10 against float32; ScaNN on the host's cores
  loss    softmax and sigmoid, naive (B x B logits) vs ring (column tiles of 256), 16k ... 256k on one device:
          compiled memory, step time where it fits, the largest batch each form fits
  serve   `jaxmr serve` (encoders on the device) over a 1M index, 1/8/32 clients (bench/serve_load.py)
  input   JPEG decode + random-resized crop at 224 px with the host's cores, next to the train step's rate
  tests   the `gpu_only` tests (tests/test_accelerator.py)

The JSON carries a `verdict` (the issue's figures, for a script to check) and `targets` (each with its value,
its threshold and whether it was met).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import RESULTS, device_slug, machine, markdown_table, peak_flops, program_bytes, refresh_index, timed

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
K = 10


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes for a real accelerator, or tiny ones for the CPU dry run (`--quick`): the same code runs both."""

    presets: tuple[str, ...] = ("b16", "s16")
    depth: int | None = None  # both towers' depth instead of the preset's (the dry run: 1, compiles in seconds)
    fit_probe_batch: int = 64  # the first compile, from which the largest batch is extrapolated
    batch_multiple: int = 64
    max_batch: int = 4096
    memory_limit: float | None = None  # bytes; None: the device's own (a CPU reports none: 2 GiB is assumed)
    steps: int = 10
    warmup: int = 3
    search_sizes: tuple[int, ...] = (1_000_000, 10_000_000)
    search_dim: int = 256
    search_queries: int = 1000
    scann_up_to: int = 1_000_000
    search_levers: bool = True  # bf16 scores and larger chunks beside the default, at the first size
    timing_s: float = 1.5  # per timing loop
    loss_sizes: tuple[int, ...] = (16384, 32768, 65536, 131072, 262144)
    loss_dim: int = 256
    input_images: int = 512
    input_batches: int = 20
    input_batch_size: int = 128
    serve_size: int = 1_000_000
    serve_seconds: float = 5.0
    torch_compile: bool = True


QUICK = Plan(
    presets=("tiny",),
    depth=1,
    fit_probe_batch=16,  # = max_batch: one compile (the fit's step-down has its own test, without compiling)
    batch_multiple=8,
    max_batch=16,
    memory_limit=2 * GIB,
    steps=2,
    warmup=1,
    search_sizes=(3000, 6000),
    search_dim=32,
    search_queries=50,
    scann_up_to=3000,
    search_levers=False,  # a CPU's bf16 top-k takes half a second a batch: nothing to learn here
    timing_s=0.2,
    loss_sizes=(512, 1024),
    loss_dim=32,
    input_images=24,
    input_batches=2,
    input_batch_size=8,
    serve_size=5000,
    serve_seconds=1.0,
    torch_compile=False,
)

# (section, time limit s, time kept for it s): sections run in this order; each may use up to its limit, less
# what the sections after it keep. `train:N` is the plan's N-th preset, jaxmr's step then PyTorch's.
ORDER = [("probe", 40, 10), ("train:0", 300, 90), ("search", 100, 40), ("loss", 70, 25), ("serve", 130, 45),
         ("input", 40, 15), ("tests", 90, 30), ("train:1", 160, 0)]  # fmt: skip
TARGETS = [  # (verdict key, "min" or "max", threshold): the targets
    ("train_over_torch", "min", 1.0),
    ("mfu", "min", 0.40),
    ("search_p50_ms_1m", "max", 0.3),
    ("search_batch1024_ms_1m", "max", 2.0),
    ("search_recall_1m", "min", 0.99),
    ("mesh_p50_ms_1m", "max", 0.3),  # issue 23: the mesh backend (MeshSearch) as a server and `index knn` use it
    ("mesh_batch1024_ms_1m", "max", 2.0),
    ("serve_p50_ms", "max", 3.0),
]


# --------------------------------------------------------------------------------------------- the device


def _device():
    import jax

    return jax.devices()[0]


def memory_limit(plan: Plan) -> float:
    """Bytes a program may use on the first device: what its allocator allows, or the plan's stand-in."""
    if plan.memory_limit:
        return plan.memory_limit
    stats = _device().memory_stats() or {}
    return float(stats.get("bytes_limit") or 2 * GIB)


def peak_memory() -> float | None:
    """Bytes the first device's allocator has held at most so far (None where it does not say: a CPU)."""
    stats = _device().memory_stats() or {}
    return float(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def probe(plan: Plan, emit: Callable[[dict], None]) -> None:
    import jax
    import jax.numpy as jnp

    device = _device()
    n = 8192 if device.platform != "cpu" else 512
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    matmul = jax.jit(lambda x: x @ x)
    seconds = timed(lambda: matmul(a).block_until_ready(), 10)
    big = jnp.ones((GIB // 4 if device.platform != "cpu" else 2**22,), jnp.float32)
    copy = jax.jit(lambda x: x + 1)
    copy_s = timed(lambda: copy(big).block_until_ready(), 10)
    emit({
        "device": device.device_kind, "platform": device.platform, "devices": jax.device_count(),
        "memory_limit_gib": memory_limit(plan) / GIB, "matmul_bf16_tflops": 2 * n**3 / seconds / 1e12,
        "copy_gb_per_s": 2 * big.nbytes / copy_s / 1e9,
        "peak_bf16_tflops_datasheet": (peak_flops(device.device_kind) or 0) / 1e12,
        "versions": _versions(),
    })  # fmt: skip


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
                 "numpy", "torch", "scann", "grain", "litestar", "tokenizers", "pillow"):  # fmt: skip
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


# ------------------------------------------------------------------------------------------- train step


def bench_model(preset: str, depth: int | None = None):
    """The preset in bf16 compute (float32 parameters and loss), both towers `depth` deep when given."""
    from jaxmr.models import PRESETS

    model = dataclasses.replace(PRESETS[preset], dtype="bfloat16")
    if depth:
        model = dataclasses.replace(model, image=dataclasses.replace(model.image, depth=depth),
                                    text=dataclasses.replace(model.text, depth=depth))  # fmt: skip
    return model


def _train_setup(preset: str, batch: int, depth: int | None = None, devices=None):
    from bench.train_throughput import compile_step

    return compile_step(bench_model(preset, depth), batch, devices)


def fit_batch(preset: str, plan: Plan, limit: float) -> tuple[int, tuple, list[dict]]:
    """(batch, its compiled setup, every try): the largest batch (a multiple of plan.batch_multiple, at most
    plan.max_batch) whose compiled train step fits in 92 % of `limit`. Memory is affine in the batch, so one
    compile at a small batch and the state's size give the slope; the prediction is compiled, and stepped down
    while it is over (at most three tries; the small batch itself when none fits)."""
    import jax

    b0 = plan.fit_probe_batch
    best = _train_setup(preset, b0, plan.depth)
    best_batch, (trainable, _, compiled, compile_s) = b0, best
    abstract = trainable.abstract_state()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.params))
    fixed = state_bytes + 2 * params  # the state, its gradients and the optimizer's update
    used = program_bytes(compiled)
    tries = [{"batch": b0, "program_gib": used / GIB, "compile_s": compile_s}]
    batch = int((0.9 * limit - fixed) / max((used - fixed) / b0, 1.0))
    for _ in range(3):
        batch = max(plan.batch_multiple, min(plan.max_batch, batch // plan.batch_multiple * plan.batch_multiple))
        if any(t["batch"] == batch for t in tries):
            break
        try:
            candidate = _train_setup(preset, batch, plan.depth)
        except Exception as error:  # a compiler that refuses a program over the device's memory: half as big
            tries.append({"batch": batch, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            batch //= 2
            continue
        used = program_bytes(candidate[2])
        tries.append({"batch": batch, "program_gib": used / GIB, "compile_s": candidate[3]})
        if used <= 0.92 * limit:
            best_batch, best = batch, candidate
            break
        batch = int(batch * (0.9 * limit - fixed) / max(used - fixed, 1.0))
    return best_batch, best, tries


def train_jax(plan: Plan, emit: Callable[[dict], None], preset: str, batch: int | None = None) -> None:
    from bench.train_throughput import step_flops, time_steps

    limit = memory_limit(plan)
    tries: list[dict] = []
    if batch is None:
        batch, (trainable, data, compiled, compile_s), tries = fit_batch(preset, plan, limit)
    else:
        trainable, data, compiled, compile_s = _train_setup(preset, batch, plan.depth)
    try:
        step_s, loss = time_steps(trainable, data, compiled, plan.steps, plan.warmup)
    except Exception as error:  # the allocator's fragmentation can refuse what the compiler planned: 3/4 of it
        if "RESOURCE_EXHAUSTED" not in str(error) or batch <= plan.batch_multiple:
            raise
        del trainable, data, compiled
        batch = max(plan.batch_multiple, batch * 3 // 4 // plan.batch_multiple * plan.batch_multiple)
        tries.append({"batch": batch, "note": f"out of memory when run: {str(error)[:160]}"})
        trainable, data, compiled, compile_s = _train_setup(preset, batch, plan.depth)
        step_s, loss = time_steps(trainable, data, compiled, plan.steps, plan.warmup)
    flops = step_flops(compiled)
    device = _device()
    peak = peak_flops(device.device_kind)
    used = peak_memory()
    emit({
        "side": "jaxmr", "model": preset, "dtype": "bfloat16", "batch": batch, "examples_per_s": batch / step_s,
        "step_ms": 1e3 * step_s, "compile_s": compile_s, "tflops_per_step": flops / 1e12 if flops else None,
        "mfu": flops / step_s / peak if flops and peak else None,
        "peak_memory_gib": (used if used is not None else program_bytes(compiled)) / GIB,
        "program_gib": program_bytes(compiled) / GIB, "memory_limit_gib": limit / GIB, "loss": loss,
        "fit": tries,
    })  # fmt: skip


def train_torch(plan: Plan, emit: Callable[[dict], None], preset: str, batch: int) -> None:
    """`bench.train_throughput.torch_steps` at jaxmr's batch: bf16 autocast, torch.compile and fused AdamW on a
    GPU. An out-of-memory halves the batch (recorded)."""
    import torch

    from bench.train_throughput import torch_steps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    requested, compile_, note = batch, plan.torch_compile and device == "cuda", None
    while True:
        try:
            record = torch_steps(bench_model(preset, plan.depth), batch, plan.steps, device, bf16=True,
                                 compile=compile_, warmup=plan.warmup)  # fmt: skip
            break
        except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            if batch <= plan.batch_multiple:
                raise
            batch //= 2
        except Exception as error:  # torch.compile failing here should not cost the comparison: eager instead
            if not compile_:
                raise
            compile_, note = False, f"torch.compile failed, eager: {type(error).__name__}: {str(error)[:200]}"
    emit({"side": "torch", "model": preset, "dtype": "bfloat16 autocast", "requested_batch": requested, **record,
          "torch": torch.__version__, **({"note": note} if note else {})})  # fmt: skip


# --------------------------------------------------------------------------------------------- search


def device_clustered(n: int, d: int, queries: int, seed: int = 0):
    """`bench.common.clustered_vectors`' recipe drawn on the device (10M x 256 in seconds, no host copy):
    (database [n, d], text queries [2 * queries, d]) float32 unit vectors, the queries with their modality gap."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), 6)
    clusters = max(n // 100, 10)
    centres = jax.random.normal(keys[0], (clusters, d)) / math.sqrt(d)
    gap_img, gap_txt = jax.random.normal(keys[1], (2, d)) / math.sqrt(d) * 0.8

    @jax.jit
    def sample(key, count_like, offset, noise):
        k1, k2 = jax.random.split(key)
        x = centres[jax.random.randint(k1, (count_like.shape[0],), 0, clusters)] + offset
        x = x + jax.random.normal(k2, x.shape) * (noise / math.sqrt(d))
        return x / jnp.linalg.norm(x, axis=1, keepdims=True)

    database = sample(keys[2], jnp.empty((n, 0)), gap_img, 0.9)
    text = sample(keys[3], jnp.empty((2 * queries, 0)), gap_txt, 1.2)
    return database, text


def search(plan: Plan, emit: Callable[[dict], None]) -> None:
    import gc

    import jax

    for n in plan.search_sizes:
        _search_size(plan, n, emit)
        gc.collect()
        jax.clear_caches()


def _search_size(plan: Plan, n: int, emit: Callable[[dict], None]) -> None:
    from bench.search_latency import batch_qps, build_scann, recall_at_k, single_latencies
    from jaxmr.index.ann import JaxExactSearch
    from jaxmr.index.mesh import MeshSearch

    database, text = device_clustered(n, plan.search_dim, plan.search_queries)
    queries, calibration = np.asarray(text[: plan.search_queries]), np.asarray(text[plan.search_queries :])
    exact32 = JaxExactSearch(database, "float32")
    truth = exact32(queries, K)[0]
    methods = {
        "exact bf16 (top_k)": lambda: JaxExactSearch(database, "bfloat16"),
        "approx bf16 (approx_max_k 0.95)": lambda: JaxExactSearch(database, "bfloat16", recall_target=0.95),
        "exact float32 (top_k)": lambda: exact32,
    }
    if plan.search_levers and n == plan.search_sizes[0]:  # the levers for batched search, at the first size
        methods["exact bf16, bf16 scores"] = lambda: JaxExactSearch(database, "bfloat16", score_dtype="bfloat16")
        methods["exact bf16, 4x larger chunks"] = lambda: JaxExactSearch(database, "bfloat16", max_scores=1 << 27)
    if n <= plan.scann_up_to:
        methods["scann (auto, host cores)"] = lambda: build_scann(np.asarray(database), calibration).search
        methods[MESH] = lambda: functools.partial(_rows, MeshSearch(np.asarray(database), np.arange(n)))
    for name, make in methods.items():
        start = time.perf_counter()
        built = make()
        fn = built if not isinstance(built, JaxExactSearch) else functools.partial(_rows, built)
        fn(queries[:1])  # compiles one query's program
        ready_s = time.perf_counter() - start
        ms = single_latencies(fn, queries, plan.timing_s)
        record = {
            "n": n, "d": plan.search_dim, "method": name, "recall_at_10": recall_at_k(fn(queries), truth),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "build_or_compile_s": ready_s, "device": "host" if name.startswith("scann") else _device().device_kind,
        }  # fmt: skip
        for batch in (32, 1024):
            qps = batch_qps(fn, queries, batch, plan.timing_s)
            record[f"qps_batch{batch}"], record[f"batch{batch}_ms"] = qps, 1e3 * batch / qps
        emit(record)


MESH = "mesh bf16 (MeshSearch, every device)"


def _rows(search, queries: np.ndarray) -> np.ndarray:
    found = search.search(queries, K) if hasattr(search, "search") else search(queries, K)
    return found[0]


# ----------------------------------------------------------------------------------------------- losses


def loss(plan: Plan, emit: Callable[[dict], None]) -> None:
    """Compiled memory of value_and_grad of each loss form on one device (`bench.loss_memory.compile_loss` on
    a one-device mesh, where the ring form scores 256-column tiles); timed where it fits (a form that does not
    fit at one size is only compiled at the larger ones)."""
    from bench.loss_memory import compile_loss, step_seconds  # (its 8 fake CPU devices leave a GPU as it is)
    from jaxmr.sharding import make_mesh

    limit = memory_limit(plan)
    mesh = make_mesh([("data", 1)])
    for name in ("softmax", "sigmoid"):
        for form in ("naive", "ring"):
            fits = True
            for size in plan.loss_sizes:
                record = {"loss": name, "form": form, "global_batch": size, "dim": plan.loss_dim}
                try:
                    compiled, sharding, scalars, used, _ = compile_loss(name, form, mesh, size, plan.loss_dim)
                    record["program_gib"] = used / GIB
                    fits = fits and used <= 0.95 * limit
                    if fits:
                        seconds = step_seconds(compiled, sharding, scalars, size, plan.loss_dim, 2)
                        record["step_ms"] = 1e3 * seconds
                except Exception as error:  # XLA's RESOURCE_EXHAUSTED at compile or run time: does not fit
                    fits = False
                    record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                record["fits"] = fits
                emit(record)


# ---------------------------------------------------------------------------------------- input, serving


def write_jpegs(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` photo-sized JPEGs (500 x 375, smooth colour fields with noise, ~50 KB each, quality 90) and a
    captions.tsv: a stand-in for Flickr8k, which does not travel to the accelerator machine."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["image\tcaption"]
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(count):
        a, b, c = rng.uniform(0.005, 0.03, 3)
        phase = rng.uniform(0, 6.3, 3)
        field = np.stack([np.sin(a * xx + phase[0]) + np.cos(b * yy + phase[1]),
                          np.sin(c * (xx + yy) + phase[2]), np.cos(a * yy - b * xx)], -1)  # fmt: skip
        pixels = (field * 50 + 128 + rng.normal(0, 12, field.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i:05d}.jpg", quality=90)
        rows.append(f"{i:05d}.jpg\ta photo number {i} with {('red', 'green', 'blue')[i % 3]} colours")
    (folder / "captions.tsv").write_text("\n".join(rows) + "\n")
    return folder


def input_pipeline(plan: Plan, emit: Callable[[dict], None]) -> None:
    from bench.input_pipeline import measure

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_jpegs(Path(tmp), plan.input_images)
        for workers in sorted({0, max(1, cores - 2)}):
            record = measure(f"captions:{folder}", "train", 224, workers, plan.input_batches, plan.input_batch_size,
                             (0.5, 1.0))  # fmt: skip
            emit({**record, "source": "synthetic JPEG 500x375", "cores": cores})


def serve(plan: Plan, emit: Callable[[dict], None], workdir: str | None = None) -> None:
    """bench/serve_load.py in its own process (it trains a few-step run to take the encoders from, unless
    `workdir` names one)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "serve.json"
        command = [sys.executable, "-m", "bench.serve_load", "--size", str(plan.serve_size), "--seconds",
                   str(plan.serve_seconds), "--out", str(out)] + (["--quick"] if plan is QUICK else [])  # fmt: skip
        command += ["--workdir", workdir] if workdir else []
        subprocess.run(command, check=True, cwd=ROOT)
        for record in json.loads(out.read_text())["records"]:
            emit({**record, "encoders_on": _device().device_kind})


def tests(plan: Plan, emit: Callable[[dict], None]) -> None:
    """The gpu_only tests; on a CPU they are skipped, which the record says."""
    # tests/conftest.py pins JAX to the CPU unless JAX_PLATFORMS is set: "" lets JAX take the accelerator
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", ""))
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "gpu_only",
        "tests/test_accelerator.py",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = (result.stdout + result.stderr).strip().splitlines()
    summary = lines[-1] if lines else ""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    for part in summary.strip("= ").split(","):  # "1 failed, 4 passed, 2 errors in 3.1s"
        words = part.split()
        if len(words) >= 2 and words[0].isdigit():
            counts["error" if words[1].startswith("error") else words[1]] = int(words[0])
    emit({"returncode": result.returncode, **counts, "summary": summary,
          "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))][:20]})  # fmt: skip


CHILDREN: dict[str, Callable[..., None]] = {"probe": probe, "train_jax": train_jax, "train_torch": train_torch,
                                            "search": search, "loss": loss, "input": input_pipeline, "serve": serve,
                                            "tests": tests}  # fmt: skip


# --------------------------------------------------------------------------------------------- the runner


def run_child(name: str, params: dict, quick: bool, timeout: float, env: dict) -> dict:
    """Runs one section in its own process group (its records stream to this output as they come); returns
    {records, seconds, error?}: what it emitted before it finished, failed or was stopped. A section stopped at
    its limit is stopped with everything it started (serve_load's server, grain's workers), so nothing holds the
    device's memory or a port into the next section."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as result, tempfile.TemporaryFile("w+") as stderr:
        command = [sys.executable, "-m", "bench.accelerator", "--child", name, "--params", json.dumps(params),
                   "--result", result.name] + (["--quick"] if quick else [])  # fmt: skip
        start = time.perf_counter()
        error = None
        process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=stderr, start_new_session=True)
        try:
            if process.wait(timeout=max(timeout, 1)):
                stderr.seek(0)
                lines = stderr.read().strip().splitlines()
                print("\n".join(lines[-40:]), flush=True)
                error = f"exit status {process.returncode}: " + " | ".join(lines[-6:])[-800:]
        except subprocess.TimeoutExpired:
            error = f"stopped at its time limit of {timeout:.0f} s"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the section and whatever it left running
            process.wait()
        records = [json.loads(line) for line in Path(result.name).read_text().splitlines() if line.strip()]
    section = {"records": records, "seconds": time.perf_counter() - start}
    if error:
        section["error"] = error
    print(f"[{name} {params or ''}] {section['seconds']:.0f} s, {len(records)} records"
          + (f"; {error}" if error else ""), flush=True)  # fmt: skip
    return section


def child_env() -> dict:
    """JAX takes memory as it goes (not 75 % up front: PyTorch and the server need theirs) up to 95 % of the
    device; compiled programs are cached on disk, so a rerun on the same machine skips compilation."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "jaxmr-accelerator-xla-cache"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run(plan: Plan, budget: float, only: set[str] | None, quick: bool, workdir: str | None = None) -> dict:
    deadline = time.perf_counter() + budget
    env = child_env()
    chosen = [(slot, limit, keep) for slot, limit, keep in ORDER if not only or slot.split(":")[0] in only]
    sections: dict[str, dict] = {}
    for i, (slot, limit, _) in enumerate(chosen):
        name, _, which = slot.partition(":")
        steps: list[tuple[str, str, dict]] = [(name, name, {"workdir": workdir} if name == "serve" else {})]
        if name == "train":
            if int(which) >= len(plan.presets):
                continue
            preset = plan.presets[int(which)]
            steps = [(f"train_jax:{preset}", "train_jax", {"preset": preset}),
                     (f"train_torch:{preset}", "train_torch", {"preset": preset})]  # fmt: skip
        kept = sum(keep for _, _, keep in chosen[i + 1 :])
        for j, (key, child, params) in enumerate(steps):
            left = deadline - time.perf_counter() - kept
            if left < 15:
                sections[key] = {"records": [], "seconds": 0.0, "error": "skipped: the time budget was spent"}
                print(f"[{key}] skipped: the time budget was spent", flush=True)
                continue
            if child == "train_torch":  # the batch jaxmr found (or the probe batch when it failed)
                jax_records = sections.get(f"train_jax:{params['preset']}", {}).get("records", [])
                params = {**params, "batch": jax_records[0]["batch"] if jax_records else plan.fit_probe_batch}
            # jaxmr's side compiles twice (the fit probe, then the batch it chose): 70 % of the slot, the rest after
            share = limit * 0.7 if j < len(steps) - 1 else limit
            sections[key] = run_child(child, params, quick, min(share, left), env)
    return sections


def verdict(sections: dict[str, dict], plan: Plan) -> dict:
    def records(key: str) -> list[dict]:
        return sections.get(key, {}).get("records", [])

    probe_records = records("probe")
    result: dict = {"device": probe_records[0]["device"] if probe_records else None}
    main_preset = plan.presets[0]
    jax_train, torch_train = records(f"train_jax:{main_preset}"), records(f"train_torch:{main_preset}")
    result["train_model"] = main_preset
    result["train_examples_per_s"] = jax_train[0]["examples_per_s"] if jax_train else None
    result["train_over_torch"] = (jax_train[0]["examples_per_s"] / torch_train[0]["examples_per_s"]
                                  if jax_train and torch_train else None)  # fmt: skip
    result["mfu"] = jax_train[0]["mfu"] if jax_train else None
    first_n = plan.search_sizes[0]
    exact = [r for r in records("search") if r["n"] == first_n and r["method"] == "exact bf16 (top_k)"]
    result["search_n"] = first_n
    result["search_p50_ms_1m"] = exact[0]["p50_ms"] if exact else None
    result["search_batch1024_ms_1m"] = exact[0]["batch1024_ms"] if exact else None
    result["search_recall_1m"] = exact[0]["recall_at_10"] if exact else None
    mesh = [r for r in records("search") if r["n"] == first_n and r["method"] == MESH]
    result["mesh_p50_ms_1m"] = mesh[0]["p50_ms"] if mesh else None
    result["mesh_batch1024_ms_1m"] = mesh[0]["batch1024_ms"] if mesh else None
    largest: dict[str, int | None] = {}
    for r in records("loss"):
        key = f"{r['loss']}/{r['form']}"
        largest.setdefault(key, None)
        if r.get("fits") and "step_ms" in r:
            largest[key] = max(largest[key] or 0, r["global_batch"])
    result["loss_max_global_batch"] = largest
    one_client = [r for r in records("serve") if r.get("clients") == 1]
    result["serve_p50_ms"] = one_client[0]["p50_ms"] if one_client else None
    inputs = records("input")
    result["input_images_per_s"] = max((r["images_per_s"] for r in inputs), default=None)
    if result["input_images_per_s"] and result["train_examples_per_s"]:
        result["input_over_train"] = result["input_images_per_s"] / result["train_examples_per_s"]
    gpu_tests = records("tests")
    result["gpu_tests"] = gpu_tests[0]["summary"] if gpu_tests else None
    return result


def targets(result: dict) -> list[dict]:
    rows = []
    for key, kind, threshold in TARGETS:
        value = result.get(key)
        met = None if value is None else (value >= threshold if kind == "min" else value <= threshold)
        rows.append({"figure": key, "value": value, "target": f"{'>=' if kind == 'min' else '<='} {threshold:g}",
                     "met": met, "ratio_to_target": None if value is None else value / threshold})  # fmt: skip
    ring, naive = (
        result["loss_max_global_batch"].get("softmax/ring"),
        result["loss_max_global_batch"].get("softmax/naive"),
    )
    met = None if ring is None else ring >= 65536 and (naive is None or naive < 65536)
    rows.append({"figure": "softmax ring fits 64k, naive does not", "value": f"ring {ring}, naive {naive}",
                 "target": "ring >= 65536 > naive", "met": met})  # fmt: skip
    return rows


COLUMNS = {
    "probe": ["device", "platform", "memory_limit_gib", "matmul_bf16_tflops", "copy_gb_per_s",
              "peak_bf16_tflops_datasheet"],
    "train": ["side", "model", "dtype", "batch", "examples_per_s", "step_ms", "compile_s", "tflops_per_step", "mfu",
              "peak_memory_gib"],
    "search": ["n", "d", "method", "recall_at_10", "p50_ms", "p99_ms", "qps_batch32", "qps_batch1024", "batch1024_ms",
               "build_or_compile_s"],
    "loss": ["loss", "form", "global_batch", "program_gib", "fits", "step_ms", "error"],
    "serve": ["index_size", "dim", "clients", "requests", "errors", "p50_ms", "p99_ms", "requests_per_s"],
    "input": ["source", "image_size", "crop", "workers", "batch_size", "images_per_s"],
    "tests": ["passed", "failed", "skipped", "summary"],
}  # fmt: skip


def write(sections: dict, plan: Plan, out_dir: Path, quick: bool, budget: float, wall_s: float) -> Path:
    info = machine()
    result = verdict(sections, plan)
    slug = device_slug(info["accelerator"].split(":", 1)[-1], info["accelerator"].split(":", 1)[0])
    stem = out_dir / f"accelerator-{slug}{'-quick' if quick else ''}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "accelerator", "machine": info, "quick": quick, "budget_s": budget, "wall_s": wall_s,
               "verdict": result, "targets": targets(result), "sections": sections}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    plots = _plot_loss(sections, stem)
    md = [f"## Accelerator suite{' (dry run, tiny sizes)' if quick else ''}: {result['device']}\n",
          f"Machine: {info['cpu']}, {info['cores']} cores, {info['accelerator']}; {info['date']}; {wall_s:.0f} s of a "
          f"{budget:.0f} s budget. `python -m bench.accelerator` (`make bench-accel`).\n",
          "### Targets\n", markdown_table(payload["targets"], ["figure", "value", "target", "met"]) + "\n"]  # fmt: skip
    tables = [("Device", "probe", "probe"), ("Train step", "train_", "train"), ("Search", "search", "search"),
              ("Loss memory", "loss", "loss"), ("Serving", "serve", "serve"), ("Input pipeline", "input", "input"),
              ("gpu_only tests", "tests", "tests")]  # fmt: skip
    for title, prefix, table in tables:
        columns = COLUMNS[table]
        keys = [k for k in sections if k.startswith(prefix)]
        rows = [r for k in keys for r in sections[k]["records"]]
        errors = [f"- `{k}`: {sections[k]['error']}" for k in keys if "error" in sections[k]]
        if rows or errors:
            md.append(f"### {title}\n")
            md.append((markdown_table(rows, columns) + "\n") if rows else "")
            md.extend(e + "\n" for e in errors)
    versions = next((r.get("versions") for r in sections.get("probe", {}).get("records", [])), None)
    if versions:
        md.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".\n")
    md += [f"![{p.stem}]({p.name})\n" for p in plots]
    stem.with_suffix(".md").write_text("\n".join(md))
    if out_dir == RESULTS and not quick:
        refresh_index()
    return stem.with_suffix(".json")


def _plot_loss(sections: dict, stem: Path) -> list[Path]:
    rows = sections.get("loss", {}).get("records", [])
    if not rows:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    figure, axes = plt.subplots(figsize=(6.5, 4))
    for key in sorted({(r["loss"], r["form"]) for r in rows}):
        points = [
            (r["global_batch"], r["program_gib"]) for r in rows if (r["loss"], r["form"]) == key and "program_gib" in r
        ]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=f"{key[0]} {key[1]}")
    limit = next((r["memory_limit_gib"] for r in sections.get("probe", {}).get("records", [])), None)
    if limit:
        axes.axhline(limit, color="grey", linestyle="--", label="device memory")
    axes.set(xscale="log", yscale="log", xlabel="global batch", ylabel="compiled program (GiB)",
             title="Loss value_and_grad memory on one device")  # fmt: skip
    axes.legend()
    path = stem.parent / f"{stem.name}-loss-memory.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes on any machine: the CPU dry run")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all sections together")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated sections: " + ", ".join(dict.fromkeys(n.split(":")[0] for n, *_ in ORDER)),
    )
    parser.add_argument("--out", default=None, help="results folder (default bench/results; --quick: a temp folder)")
    parser.add_argument(
        "--workdir", default=None, help="serve: a training run whose encoders answer (default: train one)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    plan = QUICK if args.quick else Plan()
    if args.child:
        with open(args.result, "a") as sink:

            def emit(record: dict) -> None:
                print(record, flush=True)
                sink.write(json.dumps(record, default=str) + "\n")
                sink.flush()

            CHILDREN[args.child](plan, emit, **json.loads(args.params))
        return
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    known = {n.split(":")[0] for n, *_ in ORDER}
    if only and not only <= known:
        parser.error(f"unknown sections: {', '.join(sorted(only - known))}; known: {', '.join(sorted(known))}")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="accelerator-")) if args.quick else RESULTS)
    os.environ.update({k: v for k, v in child_env().items() if k.startswith("XLA_PYTHON")})  # this process too
    start = time.perf_counter()
    sections = run(plan, args.budget, only, args.quick, args.workdir)
    path = write(sections, plan, out, args.quick, args.budget, time.perf_counter() - start)
    print(f"wrote {path} and {path.with_suffix('.md').name}")
    print(json.dumps(json.loads(path.read_text())["verdict"], indent=2))


if __name__ == "__main__":
    main()
