"""What one process of a web-scale run pays before its first batch, at LAION / DataComp sizes (synthetic
manifests, since the shards themselves cannot be here), and the input pipeline's rate beside the tree before.

    python -m bench.webscale_planner [--processes 32] [--base-tree DIR] [--blocks 3] [--quick] [--out FILE]

- planner: the stream's `StreamPlan` over 1k / 10k / 40k / 100k virtual shards holding 10M / 400M samples
  (10,000 a shard is img2dataset's default), process 0 of `--processes`, shuffle buffer 1,000: seconds from
  nothing to its first local batch of 256 samples, and tracemalloc's peak of Python heap (plain and resampled).
- arrayrecord: `ArrayRecordSource` opening a manifest of that many shards and samples (empty shard files: it
  opens none until a record is read): seconds and peak heap.
- pipeline (with `--base-tree`, a checkout of the commit before, e.g. `git worktree add /tmp/base 472611d`):
  images/s of the stream (`wds:`, 224 px, random-resized crops) and of the random-access `wds:` and ArrayRecord
  pipelines
  over Flickr8k's photos written as shards, this tree and the base tree in alternating blocks, each in its own
  process; median and spread of the blocks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from bench.common import write_results
from jaxmr.data.arrayrecord import ArrayRecordSource, shard_name
from jaxmr.data.stream import StreamConfig, StreamPlan

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"


class VirtualUnits:
    """`counts[u]` samples in unit u, each yielded as its (unit, position) and never read from a file: what the
    planner sees of tar shards, at no cost but the counts array (tests/data/test_webscale.py uses it too)."""

    def __init__(self, counts: np.ndarray):
        self.counts, self.name = counts, f"virtual:{len(counts)}"

    def __len__(self) -> int:
        return len(self.counts)

    def read_from(self, unit: int, position: int):
        for i in range(position, int(self.counts[unit])):
            yield i, i + 1, (unit, i)

    def read_at(self, unit: int, position: int):
        return unit, position


def _measure(make) -> tuple[float, int]:
    tracemalloc.start()
    start = time.perf_counter()
    make()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak


def planner_rows(shard_counts, sample_counts, processes: int) -> list[dict]:
    rows = []
    for shards in shard_counts:
        for samples in sample_counts:
            for resampled in (False, True):
                units = VirtualUnits(np.full(shards, samples // shards))
                config = StreamConfig(batch_size=256 * processes, buffer=1000, resampled=resampled)

                def first_batch(units=units, config=config):
                    plan = StreamPlan(units, config, 0, processes)
                    return [plan.draw() for _ in range(256)]

                seconds, peak = _measure(first_batch)
                rows.append({"part": "stream planner" + (" (resampled)" if resampled else ""), "shards": shards,
                             "samples": samples, "processes": processes, "startup_s": seconds,
                             "peak_mib": peak / 2**20, "bytes_per_shard": peak / shards})  # fmt: skip
    return rows


def arrayrecord_rows(shard_counts, sample_counts) -> list[dict]:
    rows = []
    for shards in shard_counts:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            names = [shard_name("train", s, shards) for s in range(shards)]
            for name in names:
                (root / f"{name}.array_record").touch()
            for samples in sample_counts:
                split = {"shards": names, "counts": [samples // shards] * shards, "records": samples}
                (root / "manifest.json").write_text(json.dumps({"splits": {"train": split}}))
                sizes = []
                seconds, peak = _measure(lambda root=root, sizes=sizes: sizes.append(len(ArrayRecordSource(root))))
                assert sizes == [samples // shards * shards]
                row = {"part": "arrayrecord source", "shards": shards, "samples": samples, "processes": 1}
                rows.append({**row, "startup_s": seconds, "peak_mib": peak / 2**20, "bytes_per_shard": peak / shards})
    return rows


# ---------------------------------------------------------------------------------------- the pipeline

# Run in a fresh process with the tree under test first on sys.path: only what both trees have.
PIPELINE = r"""
import json, sys, time
from jaxmr.data import parse_source
from jaxmr.data.stream import StreamConfig, StreamIterator, stream_units
from jaxmr.data.train_batches import PipelineConfig, train_iterator
from jaxmr.text import load_tokenizer
wds, arrayrecord, tokenizer_dir, batches = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tokenizer = load_tokenizer(tokenizer_dir)
def rate(iterator):
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * 64 / (time.perf_counter() - start)
stream = StreamIterator(stream_units("wds:" + wds), tokenizer, StreamConfig(batch_size=64, image_size=224,
    crop_scale=(0.35, 1.0), buffer=256, read_threads=2))
tars = train_iterator(parse_source("wds:" + wds, "all"), tokenizer, PipelineConfig(batch_size=64, image_size=224,
    crop_scale=(0.35, 1.0), read_threads=2))
source = parse_source("arrayrecord:" + arrayrecord, "all")
ra = train_iterator(source, tokenizer, PipelineConfig(batch_size=64, image_size=224, crop_scale=(0.35, 1.0),
    read_threads=2))
print(json.dumps({"stream": rate(stream), "wds random access": rate(tars), "arrayrecord": rate(ra)}))
stream.close(); tars.close(); ra.close()
"""


# Python heap an opened ArrayRecord source holds per record, 1M tiny records in 16 shards (in each tree)
HEAP = r"""
import json, sys, tracemalloc
from pathlib import Path
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from jaxmr.data.arrayrecord import ArrayRecordSource, encode_record, shard_name
root, shards, per = Path(sys.argv[1]), 16, 62_500
if not (root / "manifest.json").exists():
    names = [shard_name("train", s, shards) for s in range(shards)]
    for s, name in enumerate(names):
        writer = ArrayRecordWriter(str(root / f"{name}.array_record"), "group_size:1")
        captions = [[f"caption {s}-{i}"] for i in range(per)]
        for i, c in enumerate(captions):
            writer.write(encode_record(b"x", c, f"{s}-{i}", {}))
        writer.close()
        (root / f"{name}.captions.json").write_text(json.dumps(captions))
    split = {"shards": names, "counts": [per] * shards, "records": shards * per}
    (root / "manifest.json").write_text(json.dumps({"splits": {"train": split}, "skipped": {}}))
tracemalloc.start()
source = ArrayRecordSource(root)
reads = [source[int(i)] for i in np.random.default_rng(0).integers(len(source), size=200)]
print(json.dumps({"bytes_per_record": tracemalloc.get_traced_memory()[0] / len(source)}))
"""


def heap_rows(base: Path | None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, tree in (("this tree", ROOT), ("base tree", base)):
            if tree is None:
                continue
            out = subprocess.run([sys.executable, "-c", HEAP, tmp], cwd=tree, check=True, capture_output=True,
                                 text=True, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})  # fmt: skip
            held = json.loads(out.stdout.strip().splitlines()[-1])["bytes_per_record"]
            rows.append({"part": "arrayrecord source heap, 1M records (bytes a record)", "shards": 16,
                         "samples": 1_000_000, "tree": name, "bytes_per_record": held})  # fmt: skip
    return rows


def _write_flickr_shards(out: Path, n: int) -> tuple[Path, Path, Path]:
    import io
    import tarfile

    from jaxmr.data.convert import convert_to_arrayrecord
    from jaxmr.text import train_bpe

    lines = (FLICKR8K / "captions.tsv").read_text().splitlines()[1:]
    pairs = list(dict((line.split("\t")[0], line.split("\t")[2]) for line in lines).items())[:n]
    wds = out / "wds"
    wds.mkdir()
    for s in range(0, len(pairs), 100):
        with tarfile.open(wds / f"{s // 100:05d}.tar", "w") as tar:
            for i, (image, caption) in enumerate(pairs[s : s + 100]):
                for ext, data in (("jpg", (FLICKR8K / "images" / image).read_bytes()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{s + i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    convert_to_arrayrecord(f"wds:{wds}", out / "ar", shards=4, workers=1, progress=False)
    train_bpe([c for _, c in pairs], 512, max_len=32).save(out / "tokenizer")
    return wds, out / "ar", out / "tokenizer"


def pipeline_rows(base: Path, blocks: int, images: int, batches: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        wds, ar, tok = _write_flickr_shards(Path(tmp), images)
        runs: dict[str, list[dict]] = {"this tree": [], "base tree": []}
        for _ in range(blocks):
            for name, tree in (("this tree", ROOT), ("base tree", base)):
                out = subprocess.run([sys.executable, "-c", PIPELINE, str(wds), str(ar), str(tok), str(batches)],
                                     cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin",
                                                    "JAXMR_CACHE": f"{tmp}/cache-{name.split()[0]}"},
                                     capture_output=True, text=True, check=True)  # fmt: skip
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for part in ("stream", "wds random access", "arrayrecord"):
        for name, results in runs.items():
            values = [r[part] for r in results]
            rows.append({"part": f"{part} images/s (224 px, 2 threads)", "tree": name,
                         "images_per_s": statistics.median(values), "spread": max(values) - min(values),
                         "blocks": len(values)})  # fmt: skip
    for i in range(0, len(rows), 2):
        rows[i]["over_base"] = rows[i]["images_per_s"] / rows[i + 1]["images_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=32)
    parser.add_argument("--base-tree", type=Path, default=None, help="a checkout to compare the pipeline with")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes (the test of this script)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    shards = (100, 1000) if args.quick else (1_000, 10_000, 40_000, 100_000)
    samples = (1_000_000,) if args.quick else (10_000_000, 400_000_000)
    rows = planner_rows(shards, samples, args.processes) + arrayrecord_rows(shards, samples)
    if not args.quick:
        rows += heap_rows(args.base_tree)
    if args.base_tree is not None:
        rows += pipeline_rows(args.base_tree, args.blocks, 300 if args.quick else 1200, 5 if args.quick else 12)
    path = write_results(
        "webscale_planner", rows,
        ["part", "shards", "samples", "processes", "startup_s", "peak_mib", "bytes_per_shard", "tree",
         "bytes_per_record", "images_per_s", "spread", "blocks", "over_base"],
        "Web-scale start-up per process (synthetic manifests) and the input pipeline",
        notes=f"`python -m bench.webscale_planner --processes {args.processes}"
              f"{' --base-tree ' + str(args.base_tree) if args.base_tree else ''}`. Start-up and heap depend on the "
              "shard count, not the sample count: 10M and 400M samples cost the same. peak_mib is tracemalloc's "
              "peak of Python heap from nothing to the first local batch (the planner: the epoch's permutation, "
              "8 bytes a shard, drawn whole by each process; resampled draws only its own share), bytes_per_shard "
              "that peak over the shard count. The arrayrecord source's start is its manifest (a name and a count "
              "per shard) and a stat of each shard; Python caches ints below 257, so 10M samples over 100k shards "
              "(100 a shard) parse into fewer objects than 400M. The pipeline rows: images/s after the first "
              "batch, this tree and the base tree alternating in fresh processes, median of the blocks and their "
              "spread (max - min); over_base is this tree's median over the base tree's.",
        out=args.out,
    )  # fmt: skip
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
