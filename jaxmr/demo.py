"""`jaxmr demo`: the product end to end on the built-in shapes world, with what exists so far.

Today: preview the shapes world, train `configs/shapes_tiny.py` (or reuse a finished run in the workdir) and
print the text<->image recall table on the test split. Index building and the search server join here as
`jaxmr index` and `jaxmr serve` land.
"""

from __future__ import annotations

import time
from pathlib import Path

from jaxmr.config import load_config_file
from jaxmr.data import parse_source
from jaxmr.trainer import evaluate, read_metrics, train
from jaxmr.viz import caption_grid

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny.py"


def print_table(metrics: dict) -> None:
    print(f"{'direction':<14}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'median rank':>14}")
    for name, key in (("text->image", "t2i"), ("image->text", "i2t")):
        row = "".join(f"{metrics[f'{key}_r{k}']:>8.3f}" for k in (1, 5, 10))
        print(f"{name:<14}{row}{metrics[f'{key}_median_rank']:>14.1f}")
    print(f"{metrics['n_images']} images, {metrics['n_captions']} captions")


def run_demo(workdir: Path, config_spec: str | None = None) -> None:
    config = load_config_file(config_spec or str(CONFIG))
    workdir.mkdir(parents=True, exist_ok=True)
    train_split = parse_source(config.data.source, "train")
    preview = workdir / "shapes_preview.png"
    caption_grid([train_split[i] for i in range(16)], preview)
    print(f"1/3 data: {train_split.name}, {len(train_split)} training images; preview: {preview}")

    run = workdir / "shapes_tiny"
    done = [m["step"] for m in read_metrics(run) if "train/loss" in m]
    if done and max(done) >= config.steps:
        print(f"2/3 train: reusing the finished run in {run}")
    else:
        print(f"2/3 train: {config.steps} steps of batch {config.batch_size} -> {run} (resumes if interrupted)")
        start = time.perf_counter()
        train(config, run)
        print(f"    trained in {time.perf_counter() - start:.0f} s")

    print("3/3 evaluate on the shapes test split (1,000 images, 5,000 captions):")
    print_table(evaluate(run, split="test"))
    print("next: `jaxmr index` and `jaxmr serve` extend this demo to a search UI as they land.")
