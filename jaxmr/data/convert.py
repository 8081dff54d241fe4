"""Converters between data formats: any source into ArrayRecord shards (`jaxmr data convert`, read back as
`arrayrecord:DIR`), and a caption folder (any format `captions:DIR` reads) into a TFDS ArrayRecord dataset
(`tfds:caption_folder/NAME`), so that large sets are read fast and at random."""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image
from tqdm import tqdm

from jaxmr.data.arrayrecord import SPLITS, encode_record, shard_name, shard_ranges
from jaxmr.data.images import ImageReadError, load_image
from jaxmr.data.records import DataError, canonical_split
from jaxmr.data.spec import parse_source
from jaxmr.data.tfds_source import tfds_module
from jaxmr.files import atomic_path, slug, write_text

log = logging.getLogger(__name__)


def build_caption_folder(source_spec: str, out_dir: str | os.PathLike, name: str | None = None) -> Path:
    """Writes a caption folder (any format `captions:DIR` reads) as a TFDS ArrayRecord dataset.

    Returns the prepared dataset directory; read it back with `tfds:caption_folder/NAME` and
    `TFDS_DATA_DIR=out_dir` (or `data_dir=` in the spec). Missing or unreadable images are skipped and counted.
    """

    tfds = tfds_module()
    probe = parse_source(source_spec, split="all")
    config_name = name or slug(Path(getattr(probe, "root", "folder")).name.lower(), keep="", default="folder")
    sources = {}
    for split, tfds_split in (("train", "train"), ("val", "validation"), ("test", "test")):
        try:
            sources[tfds_split] = parse_source(source_spec, split=split)
        except DataError:
            continue
    skipped: list[str] = []

    def examples(source) -> Iterator[tuple[str, dict]]:
        for i in range(len(source)):
            record = source[i]
            try:
                data = Path(record["image"]).read_bytes()
                _check_image(data)
            except (OSError, ValueError) as e:
                log.warning("skipping %s: %s", record["image"], e)
                skipped.append(str(record["image"]))
                continue
            yield record["id"], {"image": data, "captions": record["captions"], "id": record["id"]}

    class CaptionFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config_name)]  # noqa: RUF012 - TFDS API

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Caption folder {source_spec}, converted by jaxmr.",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "captions": tfds.features.Sequence(tfds.features.Text()),
                        "id": tfds.features.Text(),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {split: examples(src) for split, src in sources.items()}

        def _generate_examples(self):  # pragma: no cover - _split_generators passes generators directly
            raise NotImplementedError

    CaptionFolder.name = "caption_folder"
    builder = CaptionFolder(data_dir=str(out_dir), file_format="array_record")
    builder.download_and_prepare()
    if skipped:
        log.warning("skipped %d unreadable images while converting %s", len(skipped), source_spec)
    return Path(builder.data_dir)


def _check_image(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.verify()


# ------------------------------------------------------------------------------- any source -> ArrayRecord

RECORDS_PER_SHARD = 4096  # without --shards


def _encoded(image: Any, max_side: int) -> bytes:
    """The image as bytes to store: the original file's bytes when it is a JPEG / PNG / WebP no larger than
    max_side, decoded pixels (the shapes world) as PNG (lossless), else re-encoded (JPEG, quality 95) with its
    longer side at most max_side. ImageReadError when it does not decode."""
    pil = load_image(image, min_side=max_side)
    if not isinstance(image, bytes | str) and max(pil.size) <= max_side:
        out = io.BytesIO()
        pil.save(out, format="PNG")
        return out.getvalue()
    raw = image if isinstance(image, bytes) else Path(image).read_bytes() if isinstance(image, str) else None
    if raw is not None and max(pil.size) <= max_side:
        with Image.open(io.BytesIO(raw)) as original:
            if original.format in ("JPEG", "PNG", "WEBP") and max(original.size) <= max_side:
                return raw
    if max(pil.size) > max_side:
        scale = max_side / max(pil.size)
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))),
                         Image.Resampling.BICUBIC, reducing_gap=3.0)  # fmt: skip
    out = io.BytesIO()
    pil.save(out, format="JPEG", quality=95)
    return out.getvalue()


_SOURCES: dict[tuple[str, str], Any] = {}  # a worker process opens each split's source once


def _source(spec: str, split: str):
    if (spec, split) not in _SOURCES:
        _SOURCES[(spec, split)] = parse_source(spec, split)
    return _SOURCES[(spec, split)]


def _convert_shard(task: tuple[str, str, str, int, int, int, int, str]) -> dict[str, Any]:
    """Writes one shard (records [start, stop) of the split) atomically; its `.done.json` last, so a shard
    is either complete or written again by the next run."""
    spec, out, split, index, count, start, stop, max_side = task
    out, name = Path(out), shard_name(split, index, count)
    done = out / f"{name}.done.json"
    if done.exists():
        return json.loads(done.read_text())
    source = _source(spec, split)
    skipped: collections.Counter = collections.Counter()
    captions, written = [], 0
    with atomic_path(out / f"{name}.array_record") as tmp:
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        for r in range(start, stop):
            try:
                record = source[r]
            except (OSError, ValueError) as e:
                skipped["unreadable sample"] += 1
                log.warning("convert: %s record %d: %s", source.name, r, e)
                continue
            if not record["captions"]:
                skipped["no caption"] += 1
                continue
            try:
                image = _encoded(record["image"], int(max_side))
            except (ImageReadError, OSError) as e:
                skipped["undecodable image"] += 1
                log.warning("convert: %s", e)
                continue
            metadata = {k: v for k, v in record["metadata"].items() if _jsonable(v)}
            writer.write(encode_record(image, list(record["captions"]), str(record["id"]), metadata))
            captions.append(list(record["captions"]))
            written += 1
        writer.close()
        write_text(out / f"{name}.captions.json", json.dumps(captions))
    stats = {"shard": name, "split": split, "records": written, "bytes": (out / f"{name}.array_record").stat().st_size,
             "skipped": dict(skipped), "read": stop - start}  # fmt: skip
    write_text(done, json.dumps(stats))
    return stats


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def convert_to_arrayrecord(
    source_spec: str, out: str | os.PathLike, shards: int | None = None, workers: int = 1, max_side: int = 384,
    split: str | None = None, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Any source as ArrayRecord shards under `out` (see `jaxmr.data.arrayrecord`), the source's splits kept
    (`split`: only that one). Deterministic (the same source gives the same bytes), resumable shard by shard,
    `workers` processes in parallel. Unusable samples are counted by reason in the manifest. Returns the
    manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp*"):  # what a killed run was writing (shards are renamed into place whole)
        stale.unlink()
    wanted = [canonical_split(split)] if canonical_split(split) else list(SPLITS)
    sizes, unusable = {}, {}
    for name in wanted:
        try:
            source = _source(source_spec, name)
        except DataError:
            continue  # an empty or absent split
        sizes[name] = len(source)
        unusable = dict(getattr(source, "skipped", {}))  # samples a shard source could not use (all splits')
    sizes = {k: v for k, v in sizes.items() if v}
    if not sizes:
        raise DataError(f"{source_spec}: nothing to convert")
    per = math.ceil(sum(sizes.values()) / shards) if shards else RECORDS_PER_SHARD
    tasks = []
    for name, n in sizes.items():
        count = max(1, math.ceil(n / per))
        tasks += [(source_spec, str(out), name, i, count, a, b, max_side) for i, (a, b) in
                  enumerate(shard_ranges(n, count))]  # fmt: skip
    start = time.perf_counter()
    bar = tqdm(total=sum(sizes.values()), unit="img", desc="converting", disable=not progress)
    results = []
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for stats in pool.imap(_convert_shard, tasks):
                results.append(stats)
                bar.update(stats["read"])
    else:
        for task in tasks:
            results.append(_convert_shard(task))
            bar.update(results[-1]["read"])
    bar.close()
    skipped: collections.Counter = collections.Counter(unusable)
    for stats in results:
        skipped.update(stats["skipped"])
    manifest = {
        "source": source_spec, "max_side": max_side, "format": "u32 json length | json | image bytes",
        "splits": {name: {"shards": [r["shard"] for r in results if r["split"] == name],
                          "counts": [r["records"] for r in results if r["split"] == name],
                          "records": sum(r["records"] for r in results if r["split"] == name),
                          "bytes": sum(r["bytes"] for r in results if r["split"] == name)} for name in sizes},
        "read": sum(sizes.values()), "skipped": dict(sorted(skipped.items())),
        "seconds": round(time.perf_counter() - start, 2), "workers": workers,
    }  # fmt: skip
    write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
