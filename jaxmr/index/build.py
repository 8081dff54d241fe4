"""Building an index: a model (run or export) embeds every image (and caption) of a source in resumable chunks,
across processes when there are several, and the index's first version is committed."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm import tqdm

import jaxmr
from jaxmr import distributed
from jaxmr.data import DataError, caption_table, parse_source
from jaxmr.data.images import ImageReadError, center_square, load_image
from jaxmr.encoder import Encoder
from jaxmr.export import is_export, read_export_meta
from jaxmr.files import save_npy, save_npz
from jaxmr.index.ann import AnnConfig, InvalidIndexError
from jaxmr.index.collection import Collection
from jaxmr.index.store import (
    CAPTION_SCHEMA,
    IMAGE_SCHEMA,
    INDEX_FORMAT,
    Searcher,
    _commit,
    _image_row,
    _now,
    _writer_lock,
    current_version,
)
from jaxmr.training.exports import export_model

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- build


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    captions: bool = True  # also embed and index every caption (image -> text search)
    chunk: int = 4096  # images per resumable chunk
    batch_size: int = 256  # images per encoder call (split over the devices)
    dtype: str = "float16"  # embeddings on disk: float16 | float32
    read_threads: int = 8
    ann: AnnConfig = AnnConfig()  # noqa: RUF009 - frozen, so one shared default is safe

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.chunk < 1 or self.batch_size < 1:
            raise ValueError("chunk and batch_size must be positive")


def _read(source, index: int, size: int, root: Path) -> dict[str, Any]:
    """Record `index` -> pixels for the encoder and its metadata row (image stored in files/ if needed)."""
    record = source[index]
    try:
        pil = load_image(record["image"], min_side=size)
        if isinstance(record["image"], str):
            with Image.open(record["image"]) as original:  # the real size, not the draft-decoded one
                width, height = original.size
        else:
            width, height = pil.size
    except ImageReadError as e:
        log.warning("index build: %s", e)
        return {"valid": False, "pixels": np.zeros((size, size, 3), np.uint8), "row": None}
    row = _image_row(index, record["image"], pil, list(record["captions"]), root)
    row.update(width=width, height=height)
    return {"valid": True, "pixels": center_square(pil, size), "row": row}


def build_index(
    model: str | os.PathLike,
    source_spec: str,
    out: str | os.PathLike,
    split: str | None = None,
    options: BuildOptions = BuildOptions(),
    progress: bool = True,
) -> Searcher | None:
    """Embeds every image (and caption) of a source with a trained model and writes a searchable index.

    `model` is a training run directory or a model export. Work is saved in chunks under OUT/.build, so an
    interrupted build continues where it stopped when called again with the same arguments.

    In a multi-process run (`jax.distributed`, OUT on a filesystem they share) process p embeds the chunks
    c with c % processes == p on its own devices, and process 0 merges them into the index and returns its
    Searcher; the others return None once it is written."""
    out = Path(out)
    primary = distributed.is_primary()
    if current_version(out) is not None:
        raise InvalidIndexError(f"{out} already holds an index; choose a new --out, or delete it to rebuild")
    with _writer_lock(out) if primary else contextlib.nullcontext():
        model_dir = out / "model"
        work = out / ".build"
        source = parse_source(source_spec, split)
        if len(source) == 0:
            raise DataError(f"{source.name}: nothing to index (the {split or 'all'} split has no images)")
        index, count = distributed.share()
        if count > 1 and not model_dir.exists() and not is_export(model):
            export_model(model, model_dir)  # a run's checkpoint: restored by all processes together
        if primary:
            _plan_build(Path(model), model_dir, work, source, source_spec, options)
        distributed.barrier("index: planned")
        encoder = Encoder.load(model_dir)
        share = (index, count)
        _embed_images(source, encoder, out, work, options, progress and primary, share)
        texts, owners = caption_table(source) if options.captions else ([], np.zeros(0, np.int32))
        _embed_captions(texts, encoder, work, options, progress and primary, share)
        distributed.barrier("index: embedded")
        if not primary:
            distributed.barrier("index: written")
            return None
        meta = read_export_meta(model_dir)

        chunks = [np.load(p) for p in sorted(work.glob("images-*.npz"))]
        valid = np.concatenate([c["valid"] for c in chunks])
        zimg = np.concatenate([c["embeddings"] for c in chunks])[valid]
        rows = [json.loads(r) for c in chunks for r in c["rows"]]
        rows = [r for r, ok in zip(rows, valid, strict=True) if ok]
        ids = np.flatnonzero(valid).astype(np.int64)
        dtype = np.dtype(options.dtype)
        captions, ztxt = None, np.zeros((0, encoder.embed_dim), np.float32)
        if texts:
            keep = valid[owners]
            ztxt = np.concatenate([np.load(p) for p in sorted(work.glob("captions-*.npy"))])[keep]
            cids = np.flatnonzero(keep).astype(np.int64)
            kept_texts = [t for t, k in zip(texts, keep, strict=True) if k]
            table = pa.table(
                {"id": cids, "image_id": owners[keep].astype(np.int64), "text": kept_texts}, schema=CAPTION_SCHEMA
            )
            # each side is tuned on the other side's vectors: the queries it will mostly answer
            captions = Collection.create(cids, ztxt.astype(dtype), table, options.ann, queries=zimg)
        image_table = pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)
        images = Collection.create(ids, zimg.astype(dtype), image_table, options.ann, queries=ztxt)
        source_info = {"spec": source_spec, "split": source.split or "all", "unreadable": int((~valid).sum())}
        _write_manifest(out, meta, images, captions, source_info, options.dtype, len(source), len(texts))
        shutil.rmtree(work)
        distributed.barrier("index: written")
    return Searcher(out, encoder)


def _plan_build(model: Path, model_dir: Path, work: Path, source, source_spec: str, options: BuildOptions) -> None:
    """The model copied into the index and the build's plan written (or checked, when resuming)."""
    meta = _ensure_model(model, model_dir)
    plan = {
        "fingerprint": meta["fingerprint"], "source": source_spec, "split": source.split, "n": len(source),
        "chunk": options.chunk, "captions": options.captions,
    }  # fmt: skip
    if (work / "plan.json").exists():
        previous = json.loads((work / "plan.json").read_text())
        if previous != plan:
            raise InvalidIndexError(
                f"{work} holds an unfinished build of something else ({previous}); delete {work.parent} to start over"
            )
    work.mkdir(exist_ok=True)
    (work / "plan.json").write_text(json.dumps(plan) + "\n")


def _write_manifest(
    out: Path,
    meta: dict,
    images: Collection,
    captions: Collection | None,
    source: dict,
    dtype: str,
    next_image_id: int,
    next_caption_id: int,
) -> None:
    """Version 1 of an index: the manifest and both collections, committed atomically."""
    model = meta["config"]["model"]
    manifest = {
        "format": INDEX_FORMAT,
        "jaxmr_version": jaxmr.__version__,
        "version": 1,
        "created": _now(),
        "updated": _now(),
        "model": {
            "fingerprint": meta["fingerprint"], "step": meta["step"], "workdir": meta.get("workdir"),
            "embed_dim": model["embed_dim"], "image_size": meta["image_size"],
        },
        "config": meta["config"],
        "source": {k: v for k, v in source.items() if k != "unreadable"},
        "dtype": dtype,
        "images": {
            "count": len(images), "unreadable": source.get("unreadable", 0), "ann": dataclasses.asdict(images.ann),
            "calibration": images.calibration,
        },
        "captions": (
            {"count": len(captions), "ann": dataclasses.asdict(captions.ann), "calibration": captions.calibration}
            if captions is not None else None
        ),
        "next_image_id": next_image_id,
        "next_caption_id": next_caption_id,
    }  # fmt: skip
    _commit(out, manifest, {"images": images, "captions": captions})


def write_index(
    out: str | os.PathLike,
    model: str | os.PathLike,
    vectors: np.ndarray,
    rows: list[dict[str, Any]] | None = None,
    ann: AnnConfig = AnnConfig(),  # noqa: B008 - frozen dataclass
    queries: np.ndarray | None = None,
    dtype: str = "float16",
    description: str = "precomputed vectors",
) -> None:
    """An image index from precomputed unit vectors [N, E] (ids 0..N-1) made with `model` (a run or an export):
    for embeddings computed elsewhere, and for benchmarks. `rows` are metadata rows (IMAGE_SCHEMA; default:
    no file, no captions); `queries` tune a tree (see `Collection.create`)."""
    out = Path(out)
    with _writer_lock(out):
        if current_version(out) is not None:
            raise InvalidIndexError(f"{out} already holds an index")
        meta = _ensure_model(Path(model), out / "model")
        if vectors.ndim != 2 or vectors.shape[1] != meta["config"]["model"]["embed_dim"]:
            raise ValueError(f"vectors must be [N, {meta['config']['model']['embed_dim']}], got {vectors.shape}")
        ids = np.arange(len(vectors), dtype=np.int64)
        if rows is None:
            table = pa.table({"id": ids, "path": pa.nulls(len(ids), pa.string()), "width": np.zeros(len(ids), np.int32),
                              "height": np.zeros(len(ids), np.int32), "captions": pa.array([[]] * len(ids),
                              pa.list_(pa.string()))}, schema=IMAGE_SCHEMA)  # fmt: skip
        else:
            table = pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)
        images = Collection.create(ids, vectors.astype(dtype), table, ann, queries=queries)
        _write_manifest(out, meta, images, None, {"spec": description, "split": "all"}, dtype, len(ids), 0)


def _ensure_model(model: Path, model_dir: Path) -> dict[str, Any]:
    """The index's own copy of the model export (made from a run, or copied from an export) and its meta."""
    if not model_dir.exists():
        if is_export(model):
            shutil.copytree(model, model_dir)
        else:
            export_model(model, model_dir)
    return read_export_meta(model_dir)


def _embed_images(
    source, encoder: Encoder, out: Path, work: Path, options: BuildOptions, progress: bool,
    share: tuple[int, int] = (0, 1),
) -> None:  # fmt: skip
    """Chunks c of the source's images with c % share[1] == share[0] embedded into work/images-c.npz."""
    n, size = len(source), encoder.image_size
    mine = [c for c in range(math.ceil(n / options.chunk)) if c % share[1] == share[0]]
    todo = [c for c in mine if not (work / f"images-{c:05d}.npz").exists()]
    if len(todo) < len(mine):
        log.info("resuming: %d of %d image chunks already embedded", len(mine) - len(todo), len(mine))
    total = sum(min(options.chunk, n - c * options.chunk) for c in mine)
    done = sum(min(options.chunk, n - c * options.chunk) for c in mine if c not in todo)
    bar = tqdm(total=total, initial=done, unit="img", desc="embedding images", disable=not progress, smoothing=0.1)
    with concurrent.futures.ThreadPoolExecutor(options.read_threads) as pool:
        for c in todo:
            start, stop = c * options.chunk, min(n, (c + 1) * options.chunk)
            embeddings, valid, rows = [], [], []
            for b in range(start, stop, options.batch_size):
                items = list(
                    pool.map(lambda i: _read(source, i, size, out), range(b, min(stop, b + options.batch_size)))
                )
                embeddings.append(encoder.encode_images(np.stack([it["pixels"] for it in items])))
                valid += [it["valid"] for it in items]
                rows += [json.dumps(it["row"]) for it in items]
                bar.update(len(items))
            save_npz(
                work / f"images-{c:05d}.npz", embeddings=np.concatenate(embeddings), valid=np.asarray(valid),
                rows=np.asarray(rows),
            )  # fmt: skip
    bar.close()


def _embed_captions(
    texts: list[str], encoder: Encoder, work: Path, options: BuildOptions, progress: bool,
    share: tuple[int, int] = (0, 1),
) -> None:  # fmt: skip
    chunk = options.chunk * 4
    mine = [c for c in range(math.ceil(len(texts) / chunk)) if c % share[1] == share[0]]
    total = sum(len(texts[c * chunk : (c + 1) * chunk]) for c in mine)
    bar = tqdm(total=total, unit="caption", desc="embedding captions", disable=not progress or not texts)
    for c in mine:
        part = texts[c * chunk : (c + 1) * chunk]
        path = work / f"captions-{c:05d}.npy"
        if not path.exists():
            save_npy(
                path, np.concatenate([encoder.encode_texts(part[b : b + 1024]) for b in range(0, len(part), 1024)])
            )
        bar.update(len(part))
    bar.close()


def embed_source_images(
    encoder: Encoder, source_spec: str, split: str | None = None, batch_size: int = 256, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Every readable image of a source embedded with `encoder` (nothing written): (vectors float32 [M, E], the
    source's record numbers int64 [M]). Unreadable images are skipped and logged, as a build skips them."""
    source = parse_source(source_spec, split)
    if len(source) == 0:
        raise DataError(f"{source.name}: no images (the {split or 'all'} split is empty)")
    size, vectors, numbers = encoder.image_size, [], []
    bar = tqdm(total=len(source), unit="img", desc="embedding queries", disable=not progress)
    for begin in range(0, len(source), batch_size):
        pixels = []
        for i in range(begin, min(len(source), begin + batch_size)):
            try:
                pixels.append(center_square(load_image(source[i]["image"], min_side=size), size))
                numbers.append(i)
            except ImageReadError as e:
                log.warning("queries: %s", e)
        if pixels:
            vectors.append(encoder.encode_images(np.stack(pixels)))
        bar.update(min(batch_size, len(source) - begin))
    bar.close()
    if not vectors:
        raise DataError(f"{source.name}: none of its {len(source)} images could be read")
    return np.concatenate(vectors).astype(np.float32), np.asarray(numbers, np.int64)
