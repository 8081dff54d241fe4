"""Images/s of the training input pipeline: shapes (64x64) and Flickr8k (224x224), 0 and 2 grain workers; and
web-scale shards (Flickr8k's train photos written as webdataset tars, parquet and ArrayRecord) at 224 px with
random-resized crops, 1 and 2 workers, beside the PyTorch anchor in the same run: `webdataset` + torch's
`DataLoader` with the same decode, crop and tokenizer (jaxmr's `decode`, so the per-image work is identical).

    python -m bench.input_pipeline [--batches 40] [--batch-size 64] [--shards-only] [--quick] [--out FILE]

The count starts after the first batch (worker start-up and tokenizer loading are not the steady state).
Conversion (`jaxmr data convert`, the originals kept) is timed too: samples/s per worker.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import write_results
from jaxmr.data import caption_table, parse_source
from jaxmr.data.shapes import ShapesConfig, ShapesSource
from jaxmr.data.train_batches import PipelineConfig, train_iterator
from jaxmr.text import train_bpe

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def measure(
    spec: str, split: str, image_size: int, workers: int, batches: int, batch_size: int, crop, tokenizer=None
) -> dict:
    source = parse_source(spec, split)
    tokenizer = tokenizer or train_bpe(caption_table(source)[0][:20000], vocab_size=4096, max_len=32)
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


def write_shards(folder: Path, n: int, per_shard: int = 500) -> dict[str, str]:
    """Flickr8k's first n train photos as img2dataset would write them: webdataset tars (jpg + txt + json) and a
    parquet file (jpg bytes + caption, row groups of 64); the specs that read them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = parse_source(f"captions:{FLICKR8K}", "train")
    (folder / "wds").mkdir(parents=True)
    rows = {"key": [], "jpg": [], "caption": []}
    for s in range(0, n, per_shard):
        with tarfile.open(folder / "wds" / f"{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                record = source[i]
                data, caption = Path(record["image"]).read_bytes(), record["captions"][0]
                for ext, payload in (("jpg", data), ("txt", caption.encode()), ("json", json.dumps({"i": i}).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                rows["key"].append(f"{i:09d}"), rows["jpg"].append(data), rows["caption"].append(caption)
    pq.write_table(pa.table(rows), folder / "flickr8k.parquet", row_group_size=64)
    return {"wds": f"wds:{folder / 'wds'}", "parquet": f"parquet:{folder / 'flickr8k.parquet'}"}


def torch_anchor(folder: Path, tokenizer, workers: int, batches: int, batch_size: int, size: int, crop) -> dict:
    """webdataset + torch DataLoader over the same tars: shuffle buffer, decode + random-resized crop (jaxmr's),
    tokenize, batch of uint8 images and int32 tokens."""
    import torch
    import webdataset

    from jaxmr.data.images import decode

    def transform(sample):
        rng = np.random.default_rng(int.from_bytes(sample["__key__"].encode()[-4:], "little"))
        image = decode(sample["jpg"], size, crop, rng)
        return torch.from_numpy(image), torch.from_numpy(tokenizer.encode([sample["txt"].decode()])[0])

    urls = sorted(str(p) for p in (folder / "wds").glob("*.tar"))
    dataset = (webdataset.WebDataset(urls, shardshuffle=len(urls), nodesplitter=webdataset.split_by_node,
                                     workersplitter=webdataset.split_by_worker, empty_check=False)
               .repeat().shuffle(1000).map(transform).batched(batch_size))  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    del iterator
    return {"source": "wds (webdataset + torch DataLoader)", "image_size": size, "workers": workers,
            "crop": "random-resized", "batch_size": batch_size,
            "images_per_s": batches * batch_size / seconds}  # fmt: skip


def shard_cases(batches: int, batch_size: int, n: int) -> list[dict]:
    """The shard rows: conversion, then jaxmr over wds / parquet / ArrayRecord and the torch anchor, 1 and 2
    workers, interleaved so that a slower minute of the machine hits both alike."""
    from jaxmr.data.convert import convert_to_arrayrecord

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        specs = write_shards(folder, n)
        for workers in (1, 2):
            start = time.perf_counter()
            manifest = convert_to_arrayrecord(specs["wds"], folder / f"ar{workers}", workers=workers,
                                              max_side=4096, progress=False, shards=8)  # fmt: skip
            seconds = time.perf_counter() - start
            read = manifest["read"]
            records.append({"source": f"convert wds -> arrayrecord ({read} samples, originals kept)",
                            "workers": workers, "images_per_s": read / seconds,
                            "per_worker": read / seconds / workers})  # fmt: skip
            print(records[-1])
        specs["arrayrecord"] = f"arrayrecord:{folder / 'ar1'}"
        tokenizer = train_bpe(caption_table(parse_source(specs["wds"], "all"))[0], vocab_size=4096, max_len=32)
        for workers in (1, 2):
            for kind in ("wds", "parquet", "arrayrecord"):
                record = measure(specs[kind], "all", 224, workers, batches, batch_size, (0.5, 1.0), tokenizer)
                record["source"] = kind
                records.append(record)
                print(record)
            records.append(torch_anchor(folder, tokenizer, workers, batches, batch_size, 224, (0.5, 1.0)))
            print(records[-1])
    for r in records:
        if "per_worker" not in r:
            r["per_worker"] = r["images_per_s"] / max(r["workers"], 1)
    return records


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
    parser.add_argument("--shards-only", action="store_true", help="only the shard rows (wds, parquet, ArrayRecord)")
    parser.add_argument("--shard-images", type=int, default=3000, help="Flickr8k photos written as shards")
    parser.add_argument("--out", default=None, help="write the JSON here instead of bench/results/")
    args = parser.parse_args()
    batches = 3 if args.quick else args.batches
    cases = [(f"shapes:n={1000 if args.quick else 10000},size=64", "train", 64, (1.0, 1.0))]  # quick: renders 1k
    # quick: the 224 px JPEG path's smoke test is the accelerator suite's dry run (its `input` section)
    if not args.quick and (FLICKR8K / "captions.tsv").exists():
        cases.append((f"captions:{FLICKR8K}", "train", 224, (0.5, 1.0)))
    elif not args.quick:
        print(f"Flickr8k not found at {FLICKR8K}: measuring shapes only")
    if args.shards_only:
        cases = []
    records = [] if args.shards_only else [shapes_generation(500 if args.quick else 10_000)]
    print(records[:1])
    if (FLICKR8K / "captions.tsv").exists() and not args.quick:
        records += shard_cases(batches, args.batch_size, args.shard_images)
    name = "input_pipeline_shards" if args.shards_only else "input_pipeline"
    for spec, split, size, crop in cases:
        for workers in (0, 2):
            record = measure(spec, split, size, workers, batches, args.batch_size, crop)
            print(record)
            records.append(record)
    if not args.quick or args.out:
        write_results(
            name,
            records,
            ["source", "image_size", "crop", "workers", "batch_size", "images_per_s", "per_worker", "seconds_for_10k"],
            "Input pipeline throughput (images/s)",
            out=args.out,
        )


if __name__ == "__main__":
    main()
