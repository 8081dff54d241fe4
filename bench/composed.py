"""Composed queries on the shapes edits, measured: the trained composer against both baselines on the test split.

    python -m bench.composed --base runs/demo/shapes_tiny [--workdir /tmp/shapes_composed]

Trains `configs/shapes_composed.py` on top of a trained shapes default (`--base`, a run or an export; `jaxmr
demo` or `jaxmr train --config configs/shapes_tiny.py` makes one), then evaluates the three queries side by side
on the test split (what `jaxmr eval --workdir RUN --split test` prints) and writes
bench/results/composed-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_results

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shapes_composed.py"
NAMES = {
    "composed": "trained composer (TIRG)",
    "image_only": "reference image only",
    "image_plus_text": "normalised sum of image and text embeddings",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the trained dual encoder (a run or an export)")
    parser.add_argument("--workdir", default=None, help="the composer's run (default: a temporary folder)")
    parser.add_argument("--set", default="", help="more config overrides (key=value,...)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from jaxmr.training import composed

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="jaxmr-composed-"))
    spec = f"{CONFIG}:base={Path(args.base).resolve()}" + (f",{args.set}" if args.set else "")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "jaxmr.cli", "train", "--config", spec, "--workdir", str(workdir), "--no-progress"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    train_s = time.perf_counter() - start
    metrics = composed.evaluate(workdir, split="test")
    records = [
        {"query": label, **{k: float(metrics[f"{key}_{k}"]) for k in ("r1", "r5", "r10")},
         "median_rank": float(metrics[f"{key}_median_rank"])}
        for key, label in NAMES.items()
        if f"{key}_r1" in metrics
    ]  # fmt: skip
    command = "python -m bench.composed --base BASE" + (f" --set {args.set}" if args.set else "")
    notes = (
        f"`{command}`: configs/shapes_composed.py on top of the shapes default, then the test split "
        f"({int(metrics['n_queries'])} triplets, a gallery of {int(metrics['n_gallery'])} images; the query's own "
        f"reference left out). Training: {train_s / 60:.1f} min including embedding the gallery."
    )
    extra = {"train_s": round(train_s, 1), "n_queries": int(metrics["n_queries"])}
    path = write_results("composed", records, ["query", "r1", "r5", "r10", "median_rank"],
                         "Composed queries on the shapes edits (test split)", notes, args.out, extra=extra)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
