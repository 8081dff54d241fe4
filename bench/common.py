"""What every benchmark shares: the machine description, and writing results as JSON plus a markdown table."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import socket
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


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
) -> Path:
    """Writes `<name>-<machine>.json` and `.md` under bench/results (or `out`) and refreshes the index README."""
    info = machine()
    path = Path(out) if out else RESULTS / f"{name}-{info['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": info, "records": records}, indent=2) + "\n")
    table = markdown_table(records, columns)
    md = f"## {title}\n\nMachine: {info['cpu']}, {info['cores']} cores, {info['accelerator']}; {info['date']}.\n\n"
    md += table + "\n" + (f"\n{notes}\n" if notes else "")
    path.with_suffix(".md").write_text(md)
    if out is None:
        refresh_index()
    return path


def refresh_index() -> None:
    parts = [
        "# Benchmark results\n",
        "Written by the scripts in `bench/`; each table has a JSON twin beside it.\n",
    ]
    parts += [p.read_text() for p in sorted(RESULTS.glob("*.md")) if p.name != "README.md"]
    (RESULTS / "README.md").write_text("\n".join(parts))
