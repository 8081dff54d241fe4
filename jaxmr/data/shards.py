"""Web-scale shards as random-access sources: webdataset tars (what img2dataset writes) and parquet files
(img2dataset's parquet output, Hugging Face datasets).

`wds:PATTERN` — tar shards named by brace ranges and globs (`/data/cc3m/{00000..00331}.tar`, `/data/*.tar`, or a
directory). A sample is the tar members sharing a key (the member name up to its first dot: `00042.jpg`,
`00042.txt`, `00042.json`); its image is the first of jpg / jpeg / png / webp, its caption the first of txt /
caption / text (else the json's "caption"), and its json is kept as metadata. Each shard is indexed once (member
offsets from the tar headers, no image read; cached under `jaxmr.files.cache_dir()` by path, size and mtime), so
a record is one `pread` of the image's bytes: global shuffles, exact resume and multi-process reading work as
they do for caption folders.

`parquet:PATTERN[:image=COL,caption=COL]` — parquet files; the image column (binary bytes, or a struct with a
`bytes` field as Hugging Face's Image feature stores it) and the caption column (a string, or a list of strings)
are found by type and name unless given. Rows are read by row group (the last two kept per file): a shuffled
read decodes a row group per record, so shuffle parquet by converting it (`jaxmr data convert`) or keep row
groups small.

Splits: shards carry none, so each sample goes to train / val / test by a hash of its key (90 / 5 / 5, as for a
captions file without splits): `--split all` reads everything. Samples that cannot be used are counted by
reason in `skipped` (a sample without an image, without a caption, a truncated shard's unreadable tail), never
dropped silently; an image that does not decode is counted by the training pipeline like any other.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import re
import tarfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from jaxmr.data.captions import hash_split
from jaxmr.data.records import DataError, Record, canonical_split
from jaxmr.files import atomic_dir, cache_dir, save_npz
from jaxmr.options import typed_options

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "caption", "text")
INDEX_VERSION = 2  # 2: each sample's split code kept in the index
OPEN_FILES = 256  # shard descriptors a process keeps open (40,000 shards would pass the usual limit of 1,024)
SPLIT_CODES = ("train", "val", "test")

# ---------------------------------------------------------------------------------------------- patterns


def _braces(pattern: str) -> list[str]:
    """Brace expansion: {00000..00099} (zero padding kept) and {a,b}; nested and repeated braces expand in turn."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    if (r := re.fullmatch(r"(\d+)\.\.(\d+)", body)) is not None:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in _braces(head + item + tail)]


def expand(pattern: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The files a pattern names: brace ranges, then globs; a directory means every file with one of `suffixes`
    under it. Sorted, each once; DataError when it names none."""
    if not pattern:
        raise DataError("a shard pattern is needed, e.g. /data/shards/{00000..00099}.tar")
    found: set[Path] = set()
    for part in _braces(os.path.expanduser(pattern)):
        path = Path(part)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
        elif glob.has_magic(part):
            found.update(Path(p) for p in glob.glob(part, recursive=True) if Path(p).is_file())
        elif path.is_file():
            found.add(path)
        else:
            raise DataError(f"{part} does not exist (from the pattern {pattern!r})")
    if not found:
        raise DataError(f"no {' / '.join(suffixes)} files match {pattern!r}")
    return sorted(found)


def _cache_path(path: Path, kind: str) -> Path:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{kind}|{INDEX_VERSION}"
    return cache_dir() / "shards" / f"{hashlib.sha1(key.encode()).hexdigest()}.npz"


# -------------------------------------------------------------------------------------------- webdataset


def _split_name(member: str) -> tuple[str, str]:
    """'dir/00042.seg.png' -> ('dir/00042', 'seg.png'): webdataset's key and extension."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_tar(path: Path) -> dict[str, np.ndarray]:
    """One shard's samples from its tar headers (no member data read except json captions when a sample has no
    text): keys, the image / caption / json members' (offset, size) (-1 when absent), image extensions, and
    `truncated` (1 when the tar ends in a damaged or cut-off member: the samples before it are kept)."""
    samples: dict[str, dict[str, Any]] = collections.OrderedDict()
    truncated, end = 0, path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > end:  # a header whose data the file no longer has
                    raise tarfile.ReadError(f"{member.name} ends past the end of the file")
                key, ext = _split_name(member.name)
                samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        truncated = 1
        log.warning("%s: the tar is damaged or cut off after %d samples (%s); they are kept", path, len(samples), e)
    keys, images, captions, metas, exts = [], [], [], [], []
    for key, members in samples.items():
        image_ext = next((e for e in IMAGE_EXTS if e in members), "")
        caption_ext = next((e for e in CAPTION_EXTS if e in members), "")
        keys.append(key)
        exts.append(image_ext)
        images.append(members.get(image_ext, (-1, -1)))
        captions.append(members.get(caption_ext, (-1, -1)))
        metas.append(members.get("json", (-1, -1)))
    shape = (len(keys), 2)
    return {
        "keys": np.asarray(keys, dtype=str), "image": np.asarray(images, np.int64).reshape(shape),
        "caption": np.asarray(captions, np.int64).reshape(shape), "json": np.asarray(metas, np.int64).reshape(shape),
        "ext": np.asarray(exts, dtype=str), "truncated": np.int64(truncated),
        "split": np.asarray([SPLIT_CODES.index(hash_split(k)) for k in keys], np.int8),
    }  # fmt: skip


def _cached_tar_index(path: Path) -> dict[str, np.ndarray]:
    cached = _cache_path(path, "wds")
    if cached.exists():
        try:
            with np.load(cached) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError):
            pass  # a damaged cache entry: index again
    index = index_tar(path)
    save_npz(cached, **index)
    return index


def index_shards(pattern: str, workers: int = 1, progress: bool = False) -> dict[str, Any]:
    """Indexes every tar of a `wds:` pattern ahead of training (what each process would otherwise do at its
    first start), `workers` processes at a time: the set's combined index (`set_index`). With JAXMR_CACHE on a
    shared filesystem the hosts of a run index once between them. {shards, samples, skipped, folder}."""
    folder = set_index(expand(pattern, (".tar",)), workers, progress)
    meta = json.loads((folder / "meta.json").read_text())
    return {"shards": meta["shards"], "samples": meta["samples"], "skipped": meta["skipped"], "folder": folder}


def json_caption(data: bytes) -> str | None:
    """A sample's caption from its json member (img2dataset writes it there when there is no txt), if any."""
    try:
        caption = json.loads(data).get("caption")
    except (ValueError, AttributeError):
        return None
    return caption.strip() if isinstance(caption, str) and caption.strip() else None


class _Files:
    """Read-only descriptors shared by the process's threads, read with `os.pread`; the OPEN_FILES used most
    recently stay open (a descriptor is closed only when no read holds it)."""

    def __init__(self, paths: list[Path]):
        self.paths, self._lock = paths, threading.Lock()
        self._fds: collections.OrderedDict[int, list[int]] = collections.OrderedDict()  # file -> [fd, readers]

    def read(self, file: int, offset: int, size: int) -> bytes:
        with self._lock:
            entry = self._fds.get(file)
            if entry is None:
                entry = self._fds[file] = [os.open(self.paths[file], os.O_RDONLY), 0]
                self._close_spare()
            else:
                self._fds.move_to_end(file)
            entry[1] += 1
        try:
            data = os.pread(entry[0], size, offset)
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0 and self._fds.get(file) is not entry:  # evicted while it was being read
                    os.close(entry[0])
        if len(data) != size:
            raise OSError(f"{self.paths[file]}: {size} bytes at {offset} expected, {len(data)} read")
        return data

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _close_spare(self) -> None:
        while len(self._fds) > OPEN_FILES:
            _, (fd, readers) = self._fds.popitem(last=False)
            if readers == 0:  # else the read holding it closes it
                os.close(fd)

    def __getstate__(self) -> dict:  # worker processes open their own descriptors
        return {"paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"])


ARRAYS = ("keys", "image", "caption", "json", "split")  # the per-sample arrays of a combined index


def set_index(paths: list[Path], workers: int = 1, progress: bool = False) -> Path:
    """The combined index of a set of tars (`jaxmr data index`, or a source's first start): the shards' samples
    concatenated as .npy files (keys, image / caption / json (offset, size), split codes), `starts.npy` (each
    shard's first sample), the usable samples of each split as (shard, sample) rows (`rows-SPLIT.npy`), and
    meta.json (captions found only in a json, skipped samples by reason). Keyed by every shard's path, size and
    mtime; built from the per-shard indexes (themselves cached) and written atomically."""
    key = hashlib.sha1(f"{INDEX_VERSION}".encode())
    for path in paths:
        stat = path.stat()
        key.update(f"|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    folder = cache_dir() / "shards" / f"set-{key.hexdigest()}"
    if (folder / "meta.json").exists():
        return folder
    pool = (concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            if workers > 1 else contextlib.nullcontext())  # fmt: skip
    with pool:
        indexes = pool.map(_cached_tar_index, paths, chunksize=16) if workers > 1 else map(_cached_tar_index, paths)
        indexes = list(tqdm(indexes, total=len(paths), desc="index", unit="shard", disable=not progress))
    files = _Files(paths)
    skipped: collections.Counter = collections.Counter()
    rows = {split: [] for split in (*SPLIT_CODES, "all")}
    json_captions: dict[str, str] = {}
    for s, index in enumerate(indexes):  # no Python per sample, but for captions found only in a json
        skipped["truncated shard (its tail)"] += int(index["truncated"])
        has_image, has_text = index["image"][:, 0] >= 0, index["caption"][:, 0] >= 0
        skipped["no image"] += int((~has_image).sum())
        usable = has_image & has_text
        for i in np.flatnonzero(has_image & ~has_text).tolist():
            caption = _json_caption(files, s, index["json"][i])
            if caption is None:
                skipped["no caption"] += 1
                continue
            json_captions[f"{s}/{i}"] = caption
            usable[i] = True
        for split in rows:
            chosen = np.flatnonzero(usable if split == "all" else usable & (index["split"] == SPLIT_CODES.index(split)))
            rows[split].append(np.stack([np.full(len(chosen), s, np.int64), chosen.astype(np.int64)], axis=1))
    files.close()
    with atomic_dir(folder) as tmp:
        for name in ARRAYS:
            parts = [index[name] for index in indexes]
            np.save(tmp / f"{name}.npy", np.concatenate(parts) if parts else np.zeros(0))
        np.save(tmp / "starts.npy", np.cumsum([0, *(len(index["keys"]) for index in indexes)], dtype=np.int64))
        for split, found in rows.items():
            np.save(tmp / f"rows-{split}.npy", np.concatenate(found) if found else np.zeros((0, 2), np.int64))
        meta = {"shards": len(paths), "samples": sum(len(index["keys"]) for index in indexes),
                "skipped": {k: v for k, v in skipped.items() if v}, "json_captions": json_captions}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta))
    return folder


def _json_caption(files: _Files, shard: int, where: np.ndarray) -> str | None:
    if where[0] < 0:
        return None
    try:
        return json_caption(files.read(shard, int(where[0]), int(where[1])))
    except OSError:
        return None


class WebDatasetSource:
    """`wds:PATTERN` (see the module docstring). Record: image bytes, captions [one], id "shard/key", metadata
    {shard, key, json}. Its index is the set's combined index (`set_index`), memory-mapped: a start costs a stat
    of every shard and a few mappings, and no Python object per sample."""

    def __init__(self, pattern: str, split: str | None = None):
        self.split = canonical_split(split)
        self.name = f"wds:{pattern}"
        self.shards = expand(pattern, (".tar",))
        self._files = _Files(self.shards)
        folder = set_index(self.shards)
        meta = json.loads((folder / "meta.json").read_text())
        self._folder = folder
        self._map()
        self._json_captions = meta["json_captions"]
        self.skipped = collections.Counter(meta["skipped"])
        if not len(self._rows) and not self.skipped:
            raise DataError(f"{self.name}: no samples in the {split or 'all'} split")
        if self.skipped:
            log.warning("%s: skipped %s", self.name, ", ".join(f"{n} ({why})" for why, n in self.skipped.items()))

    def _map(self) -> None:
        """The index's arrays, memory-mapped (plain ndarray views: indexing a memmap costs more per record)."""
        load = lambda name: np.asarray(np.load(self._folder / f"{name}.npy", mmap_mode="r"))
        self._keys, self._starts, self._rows = load("keys"), load("starts"), load(f"rows-{self.split or 'all'}")
        self._image, self._caption, self._json = load("image"), load("caption"), load("json")

    def __len__(self) -> int:
        return len(self._rows)

    def _sample(self, index: int) -> tuple[int, int, int]:
        """(shard, sample in it, sample in the set) of a record."""
        s, i = self._rows[index].tolist()
        return s, i, int(self._starts[s]) + i

    def _caption_of(self, s: int, i: int, g: int) -> str:
        found = self._json_captions.get(f"{s}/{i}") if self._json_captions else None
        if found is not None:
            return found
        offset, size = self._caption[g].tolist()
        return self._files.read(s, offset, size).decode("utf-8", "replace").strip()

    def captions(self, index: int) -> list[str]:
        return [self._caption_of(*self._sample(index))]

    def __getitem__(self, index: int) -> Record:
        s, i, g = self._sample(index)
        key = str(self._keys[g])
        image = self._files.read(s, *self._image[g].tolist())
        meta: dict[str, Any] = {"shard": str(self.shards[s]), "key": key}
        offset, size = self._json[g].tolist()
        if offset >= 0:
            try:
                meta["json"] = json.loads(self._files.read(s, offset, size))
            except ValueError:
                meta["json"] = None
        return {"image": image, "captions": [self._caption_of(s, i, g)], "id": f"{self.shards[s].name}/{key}",
                "metadata": meta}  # fmt: skip

    def __getstate__(self) -> dict:  # worker processes map the index themselves
        state = dict(self.__dict__)
        for name in ("_keys", "_starts", "_rows", "_image", "_caption", "_json"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map()


# ----------------------------------------------------------------------------------------------- parquet

IMAGE_COLUMNS = ("image", "jpg", "img", "png", "webp", "image_bytes", "bytes")
CAPTION_COLUMNS = ("caption", "text", "txt", "TEXT", "captions", "sentences", "prompt")
KEY_COLUMNS = ("key", "id", "url", "image_id")


def _is_image_type(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0


def _is_caption_type(kind: pa.DataType) -> bool:
    strings = (pa.types.is_string, pa.types.is_large_string)
    if any(f(kind) for f in strings):
        return True
    return pa.types.is_list(kind) and any(f(kind.value_type) for f in strings)


def row_image(value: Any) -> bytes | None:
    """A parquet image cell's bytes: binary, or a struct with `bytes` (Hugging Face's Image feature)."""
    return value.get("bytes") if isinstance(value, dict) else value


def row_captions(value: Any) -> list[str]:
    """A parquet caption cell's non-empty captions: a string, or a list of strings."""
    return [t.strip() for t in ([value] if isinstance(value, str) else value or []) if t and t.strip()]


def parquet_columns(schema: pa.Schema, image: str | None, caption: str | None, file: Path) -> tuple[str, str]:
    """The (image, caption) columns of a parquet file: the named ones, checked, else found by type and name."""
    return (_pick(schema, image, IMAGE_COLUMNS, _is_image_type, "image", file),
            _pick(schema, caption, CAPTION_COLUMNS, _is_caption_type, "caption", file))  # fmt: skip


def _pick(schema: pa.Schema, given: str | None, names: tuple[str, ...], fits, what: str, file: Path) -> str:
    if given:
        if given not in schema.names:
            raise DataError(f"{file}: no column {given!r} (it has {', '.join(schema.names)})")
        if not fits(schema.field(given).type):
            raise DataError(f"{file}: column {given!r} is {schema.field(given).type}, not an {what} column")
        return given
    candidates = [n for n in schema.names if fits(schema.field(n).type)]
    for name in names:
        if name in candidates:
            return name
    if len(candidates) == 1:
        return candidates[0]
    raise DataError(f"{file}: cannot tell the {what} column among {', '.join(schema.names) or 'none'}; name it: "
                    f"parquet:PATTERN:{what}=COLUMN")  # fmt: skip


class ParquetSource:
    """`parquet:PATTERN[:image=COL,caption=COL]` (see the module docstring). Record: image bytes, captions, id
    "file:row", metadata {file, row, key}."""

    def __init__(self, pattern: str, split: str | None = None, image: str | None = None, caption: str | None = None):
        self.split = canonical_split(split)
        self.name = f"parquet:{pattern}"
        self.files = expand(pattern, (".parquet",))
        self.skipped: collections.Counter = collections.Counter()
        self._captions: list[list[str]] = []
        rows, self._columns, self._groups = [], [], []
        for f, path in enumerate(self.files):
            try:
                meta = pq.ParquetFile(path)
            except (OSError, pa.ArrowException) as e:
                self.skipped["unreadable file"] += 1
                log.warning("%s: not a readable parquet file (%s)", path, e)
                self._columns.append(None)
                self._groups.append(np.zeros(1, np.int64))
                continue
            schema = meta.schema_arrow
            image_col, caption_col = parquet_columns(schema, image, caption, path)
            key_col = next((n for n in KEY_COLUMNS if n in schema.names and n not in (image_col, caption_col)), None)
            self._columns.append(image_col)
            sizes = [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self._groups.append(np.cumsum([0, *sizes]))
            table = pq.read_table(path, columns=[caption_col, *([key_col] if key_col else [])])
            texts = table[caption_col].to_pylist()
            keys = table[key_col].to_pylist() if key_col else [None] * len(texts)
            for r, (text, key) in enumerate(zip(texts, keys, strict=True)):
                found = row_captions(text)
                if not found:
                    self.skipped["no caption"] += 1
                    continue
                if self.split is None or hash_split(str(key) if key is not None else f"{path.name}:{r}") == self.split:
                    rows.append((f, r, len(self._captions)))
                    self._captions.append(found)
        self._rows = np.asarray(rows, np.int64).reshape(-1, 3)
        self._cache: dict[int, collections.OrderedDict] = collections.defaultdict(collections.OrderedDict)
        self._lock = threading.Lock()
        if not len(self._rows) and not self.skipped:
            raise DataError(f"{self.name}: no rows in the {split or 'all'} split")
        if self.skipped:
            log.warning("%s: skipped %s", self.name, ", ".join(f"{n} ({why})" for why, n in self.skipped.items()))

    def __len__(self) -> int:
        return len(self._rows)

    def captions(self, index: int) -> list[str]:
        return list(self._captions[int(self._rows[index][2])])

    def _group(self, f: int, g: int) -> list[Any]:
        """The image column of row group g of file f (the last two read are kept)."""
        with self._lock:
            cached = self._cache[f].get(g)
        if cached is not None:
            return cached
        column = pq.ParquetFile(self.files[f]).read_row_group(g, columns=[self._columns[f]]).column(0).to_pylist()
        with self._lock:
            self._cache[f][g] = column
            while len(self._cache[f]) > 2:
                self._cache[f].popitem(last=False)
        return column

    def __getitem__(self, index: int) -> Record:
        f, r, _ = (int(v) for v in self._rows[index])
        g = int(np.searchsorted(self._groups[f], r, side="right")) - 1
        value = self._group(f, g)[r - int(self._groups[f][g])]
        image = row_image(value)
        meta = {"file": str(self.files[f]), "row": r}
        # no bytes (a null, or a Hugging Face image stored by path only): an unreadable image, counted by the
        # pipeline
        return {"image": image if image else b"", "captions": self.captions(index), "id": f"{self.files[f].name}:{r}",
                "metadata": meta}  # fmt: skip

    def __getstate__(self) -> dict:  # worker processes keep their own row-group cache
        state = dict(self.__dict__)
        state.pop("_cache"), state.pop("_lock")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache = collections.defaultdict(collections.OrderedDict)
        self._lock = threading.Lock()


def parquet_arg(arg: str) -> tuple[str, str | None, str | None]:
    """`PATTERN[:image=COL,caption=COL]` -> (pattern, image column, caption column)."""
    pattern, options = arg, ""
    head, sep, tail = arg.rpartition(":")
    if sep and re.fullmatch(r"\s*(image|caption)=[^,]*(,\s*(image|caption)=[^,]*)*\s*", tail):
        pattern, options = head, tail
    chosen = typed_options(options, {"image": str, "caption": str}, "parquet", DataError)
    return pattern, chosen.get("image"), chosen.get("caption")


def parquet_source(arg: str, split: str | None) -> ParquetSource:
    """`parquet:PATTERN[:image=COL,caption=COL]`"""
    pattern, image, caption = parquet_arg(arg)
    return ParquetSource(pattern, split, image=image, caption=caption)
