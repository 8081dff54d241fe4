"""Images/s of the training input pipeline: shapes (64x64) and Flickr8k (224x224), 0 and 2 grain workers.

    python -m bench.input_pipeline [--batches 40] [--batch-size 64] [--quick] [--out FILE]

The count starts after the first batch (worker start-up and tokenizer loading are not the steady state).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import write_results
from jaxmr.data import caption_table, parse_source
from jaxmr.data.shapes import ShapesConfig, ShapesSource
from jaxmr.data.train_batches import PipelineConfig, train_iterator
from jaxmr.text import train_bpe

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def measure(spec: str, split: str, image_size: int, workers: int, batches: int, batch_size: int, crop) -> dict:
    source = parse_source(spec, split)
    tokenizer = train_bpe(caption_table(source)[0][:20000], vocab_size=4096, max_len=32)
    config = PipelineConfig(batch_size=batch_size, image_size=image_size, num_workers=workers, crop_scale=crop)
    iterator = train_iterator(source, tokenizer, config)
    try:
        next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        seconds = time.perf_counter() - start
    finally:
        iterator.close()
    return {
        "source": spec.split(":")[0],
        "image_size": image_size,
        "workers": workers,
        "crop": "random-resized" if crop != (1.0, 1.0) else "resize",
        "batch_size": batch_size,
        "images_per_s": batches * batch_size / seconds,
    }


def shapes_generation(n: int) -> dict:
    """Rendering the shapes world alone (no cache), in one process: images (and their captions) per second."""
    source = ShapesSource(ShapesConfig(n=n, size=64), "train", cache=False)
    start = time.perf_counter()
    for i in range(n):
        source[i]
    seconds = time.perf_counter() - start
    return {
        "source": "shapes (render only)",
        "image_size": 64,
        "workers": 0,
        "crop": "-",
        "batch_size": "-",
        "images_per_s": n / seconds,
        "seconds_for_10k": 10_000 * seconds / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="a few batches only: a smoke test, no figures")
    parser.add_argument("--out", default=None, help="write the JSON here instead of bench/results/")
    args = parser.parse_args()
    batches = 3 if args.quick else args.batches
    cases = [(f"shapes:n={1000 if args.quick else 10000},size=64", "train", 64, (1.0, 1.0))]  # quick: renders 1k
    # quick: the 224 px JPEG path's smoke test is the accelerator suite's dry run (its `input` section)
    if not args.quick and (FLICKR8K / "captions.tsv").exists():
        cases.append((f"captions:{FLICKR8K}", "train", 224, (0.5, 1.0)))
    elif not args.quick:
        print(f"Flickr8k not found at {FLICKR8K}: measuring shapes only")
    records = [shapes_generation(500 if args.quick else 10_000)]
    print(records[0])
    for spec, split, size, crop in cases:
        for workers in (0, 2):
            record = measure(spec, split, size, workers, batches, args.batch_size, crop)
            print(record)
            records.append(record)
    if not args.quick or args.out:
        write_results(
            "input_pipeline",
            records,
            ["source", "image_size", "crop", "workers", "batch_size", "images_per_s", "seconds_for_10k"],
            "Input pipeline throughput (images/s)",
            out=args.out,
        )


if __name__ == "__main__":
    main()
