"""What every benchmark shares: the machine description, and writing results as JSON plus a markdown table."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import socket
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# Dense bf16 tensor-core peaks by the vendors' datasheets (FLOP/s, no sparsity): the denominator of MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device_kind: str) -> float | None:
    """The datasheet's dense bf16 peak of a device kind such as "NVIDIA H200", or None when unknown."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_kind), None)


def program_bytes(compiled) -> float:
    """What a compiled XLA program holds at once per device: arguments + outputs + temporaries, less outputs
    that reuse a donated argument's buffer (`memory_analysis()`; needs no run)."""
    m = compiled.memory_analysis()
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def timed(fn, repeats: int) -> float:
    """Seconds per call of `fn` (which blocks on its own result), after one unmeasured call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def device_slug(device_kind: str, platform_name: str) -> str:
    """A file-name form of the accelerator: "NVIDIA H200" -> "nvidia-h200"; a CPU is "cpu<cores>"."""
    if platform_name == "cpu":
        return f"cpu{os.cpu_count()}"
    return "-".join("".join(c if c.isalnum() else " " for c in device_kind.lower()).split())


def machine() -> dict:
    """A description of this machine and the versions that matter for the numbers."""
    import jax

    versions = {}
    for package in ("jax", "jaxlib", "flax", "grain", "numpy", "pillow", "tokenizers", "scann"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = jax.devices()[0]
    accelerator = "cpu" if device.platform == "cpu" else f"{device.platform}:{device.device_kind}"
    return {
        "name": f"{accelerator.split(':')[0]}{os.cpu_count()}",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "accelerator": accelerator,
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_results(
    name: str,
    records: list[dict],
    columns: Sequence[str],
    title: str,
    notes: str = "",
    out: str | os.PathLike | None = None,
    extra: dict | None = None,
) -> Path:
    """Writes `<name>-<machine>.json` and `.md` under bench/results (or `out`) and refreshes the index README
    when they land there; `extra` adds keys to the JSON beside the records."""
    info = machine()
    path = Path(out) if out else RESULTS / f"{name}-{info['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"benchmark": name, "machine": info, "records": records, **(extra or {})}, indent=2) + "\n"
    )
    table = markdown_table(records, columns)
    md = f"## {title}\n\nMachine: {info['cpu']}, {info['cores']} cores, {info['accelerator']}; {info['date']}.\n\n"
    md += table + "\n" + (f"\n{notes}\n" if notes else "")
    path.with_suffix(".md").write_text(md)
    if path.resolve().parent == RESULTS.resolve():  # a table in bench/results joins the index
        refresh_index()
    return path


def refresh_index() -> None:
    parts = [
        "# Benchmark results\n",
        "Written by the scripts in `bench/`; each table has a JSON twin beside it.\n",
    ]
    parts += [p.read_text() for p in sorted(RESULTS.glob("*.md")) if p.name != "README.md"]
    (RESULTS / "README.md").write_text("\n".join(parts))


def clustered_vectors(n: int, d: int, n_queries: int = 1000, seed: int = 0, clusters: int | None = None):
    """Synthetic embeddings shaped like a trained dual encoder's: (database [n, d], text queries [q, d], image
    queries [q, d]), all float32 unit vectors.

    Images sit around cluster centres (cosine ~0.7 to their centre); both modalities carry their own constant
    offset (the "modality gap"), so a text query's best match has cosine ~0.4 where an image query's has ~0.7,
    as with CLIP-style models. Generated in chunks, so 1M x 512 needs no more than the result's memory.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    clusters = clusters or max(n // 100, 10)
    centres = rng.standard_normal((clusters, d)).astype(np.float32) / np.sqrt(d)
    gap_img, gap_txt = (rng.standard_normal((2, d)).astype(np.float32) / np.sqrt(d)) * 0.8

    def sample(count: int, offset: np.ndarray, noise: float) -> np.ndarray:
        out = np.empty((count, d), np.float32)
        for start in range(0, count, 65536):
            m = min(65536, count - start)
            x = centres[rng.integers(0, clusters, m)] + offset
            x += rng.standard_normal((m, d)).astype(np.float32) * (noise / np.sqrt(d))
            out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return sample(n, gap_img, 0.9), sample(n_queries, gap_txt, 1.2), sample(n_queries, gap_img, 0.9)


def model_of_width(workdir: Path, dim: int) -> str:
    """A seconds-long training run whose model embeds into `dim` (`write_index` needs a model of that width)."""
    from jaxmr.config import load_config_file
    from jaxmr.training.loop import train

    config = load_config_file(str(Path(__file__).resolve().parents[1] / "configs" / f"shapes_tiny.py:smoke,"
                                  f"model.embed_dim={dim}"))  # fmt: skip
    train(config, workdir, progress=False)
    return str(workdir)
