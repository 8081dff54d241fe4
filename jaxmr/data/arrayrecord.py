"""`arrayrecord:DIR` — what `jaxmr data convert` writes: ArrayRecord shards (grain's random-access format) of
encoded images with their captions, plus a manifest.

DIR/
    manifest.json                           counts, sizes, skipped samples by reason, the shards of each split
                                            and their record counts
    train-00000-of-00008.array_record       records: u32 JSON length | JSON {id, captions, metadata} | image bytes
    train-00000-of-00008.captions.json      the shard's captions alone (caption tables without reading images)
    val-00000-of-00001.array_record ...

A record is one random read (array_record's reader, without read-ahead, as grain's `ArrayRecordDataSource`
opens it), so the global shuffle costs nothing more than a sequential read; splits are the source's own (or, for
shards, the 90 / 5 / 5 hash of each key).

The source holds O(shards), not O(records): its shards' record counts (from the manifest; a manifest without them
opens each shard once to count), captions read from the records themselves, a caption file loaded only for
caption tables (one shard at a time), and per thread at most `OPEN_READERS` open shards — 40,000 shards at
10,000 records each cost a process a few MB and no file handle it does not use.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from jaxmr.data.records import DataError, Record, canonical_split

SPLITS = ("train", "val", "test")
OPEN_READERS = 64  # per thread: the shards read most recently stay open, the rest are closed


def encode_record(image: bytes, captions: list[str], record_id: str, metadata: dict[str, Any]) -> bytes:
    header = json.dumps({"id": record_id, "captions": captions, "metadata": metadata}).encode()
    return struct.pack("<I", len(header)) + header + image


def decode_record(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack_from("<I", data)
    return json.loads(data[4 : 4 + length]), data[4 + length :]


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}"


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    if not path.exists():
        raise DataError(f"{root}: no manifest.json; is it the output of `jaxmr data convert` (and did it finish)?")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


class ArrayRecordSource:
    """`arrayrecord:DIR` (see the module docstring). Record: image bytes, captions, id, metadata."""

    def __init__(self, root: str | os.PathLike, split: str | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"arrayrecord: {self.root} is not a directory")
        self.split = canonical_split(split)
        self.name = f"arrayrecord:{self.root}"
        manifest = read_manifest(self.root)
        chosen = [manifest["splits"].get(s, {}) for s in SPLITS if self.split in (None, s)]
        self._names = [n for c in chosen for n in c.get("shards", [])]
        missing = [n for n in self._names if not self._path(n).exists()]
        if missing:
            raise DataError(f"{self.root}: shard {missing[0]}.array_record is missing")
        if all(len(c.get("counts", [])) == len(c.get("shards", [])) for c in chosen):
            counts = [int(n) for c in chosen for n in c.get("counts", [])]
        else:  # a manifest from before the counts were kept: open each shard once
            counts = []
            for name in self._names:
                reader = ArrayRecordReader(str(self._path(name)), "readahead_buffer_size:0")
                counts.append(reader.num_records())
                reader.close()
        self._starts = np.cumsum([0, *counts], dtype=np.int64)
        if self._starts[-1] == 0:
            raise DataError(f"{self.name}: the {split or 'all'} split is empty")
        self._local = threading.local()
        self._caption_shard: tuple[int, list] = (-1, [])
        self.skipped = manifest.get("skipped", {})

    def _path(self, name: str) -> Path:
        return self.root / f"{name}.array_record"

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        """(shard, record in it) of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, int(index - self._starts[shard])

    def captions(self, index: int) -> list[str]:
        """A record's captions from its shard's caption file (kept while reads stay in that shard: caption
        tables read in order)."""
        shard, row = self._locate(index)
        cached_shard, captions = self._caption_shard
        if cached_shard != shard:
            path = self.root / f"{self._names[shard]}.captions.json"
            captions, records = json.loads(path.read_text()), int(self._starts[shard + 1] - self._starts[shard])
            if len(captions) != records:
                raise DataError(f"{path}: {len(captions)} caption lists for {records} records")
            self._caption_shard = (shard, captions)
        return list(captions[row])

    def _reader(self, shard: int) -> ArrayRecordReader:
        """This thread's reader of a shard (readers are not shared between threads; the least recently used
        beyond OPEN_READERS are closed)."""
        readers = getattr(self._local, "readers", None)
        if readers is None:
            readers = self._local.readers = collections.OrderedDict()
        reader = readers.get(shard)
        if reader is None:
            reader = readers[shard] = ArrayRecordReader(str(self._path(self._names[shard])), "readahead_buffer_size:0")
            if len(readers) > OPEN_READERS:
                readers.popitem(last=False)[1].close()
        else:
            readers.move_to_end(shard)
        return reader

    def __getitem__(self, index: int) -> Record:
        shard, row = self._locate(index)
        (data,) = self._reader(shard).read([row])
        header, image = decode_record(data)
        return {"image": image, "captions": header["captions"], "id": header["id"], "metadata": header["metadata"]}

    def __getstate__(self) -> dict:  # worker processes open their own readers
        state = dict(self.__dict__)
        state.pop("_local")
        state["_caption_shard"] = (-1, [])
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) of each of `shards` nearly equal consecutive parts of n records (deterministic)."""
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]
