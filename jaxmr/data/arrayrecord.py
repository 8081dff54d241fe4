"""`arrayrecord:DIR` — what `jaxmr data convert` writes: ArrayRecord shards (grain's random-access format) of
encoded images with their captions, plus a manifest.

DIR/
    manifest.json                           counts, sizes, skipped samples by reason, the shards of each split
    train-00000-of-00008.array_record       records: u32 JSON length | JSON {id, captions, metadata} | image bytes
    train-00000-of-00008.captions.json      the shard's captions alone (caption tables without reading images)
    val-00000-of-00001.array_record ...

A record is one random read (array_record's reader, without read-ahead, as grain's `ArrayRecordDataSource`
opens it), so the global shuffle costs nothing more than a sequential read; splits are the source's own (or, for
shards, the 90 / 5 / 5 hash of each key).
"""

from __future__ import annotations

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
        names = [n for s in SPLITS if self.split in (None, s) for n in manifest["splits"].get(s, {}).get("shards", [])]
        missing = [n for n in names if not (self.root / f"{n}.array_record").exists()]
        if missing:
            raise DataError(f"{self.root}: shard {missing[0]}.array_record is missing")
        self.paths = [str(self.root / f"{n}.array_record") for n in names]
        self._captions = [c for n in names for c in json.loads((self.root / f"{n}.captions.json").read_text())]
        self._local = threading.local()
        counts = [self._reader(s).num_records() for s in range(len(self.paths))]
        self._starts = np.cumsum([0, *counts])
        if self._starts[-1] != len(self._captions):
            raise DataError(f"{self.root}: {self._starts[-1]} records but {len(self._captions)} caption lists")
        if not self._captions:
            raise DataError(f"{self.name}: the {split or 'all'} split is empty")
        self.skipped = manifest.get("skipped", {})

    def __len__(self) -> int:
        return len(self._captions)

    def captions(self, index: int) -> list[str]:
        return list(self._captions[index])

    def _reader(self, shard: int) -> ArrayRecordReader:
        """This thread's reader of a shard (readers are not shared between threads)."""
        readers = getattr(self._local, "readers", None)
        if readers is None:
            readers = self._local.readers = {}
        if shard not in readers:
            readers[shard] = ArrayRecordReader(self.paths[shard], "readahead_buffer_size:0")
        return readers[shard]

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        (data,) = self._reader(shard).read([int(index - self._starts[shard])])
        header, image = decode_record(data)
        return {"image": image, "captions": header["captions"], "id": header["id"], "metadata": header["metadata"]}

    def __getstate__(self) -> dict:  # worker processes open their own readers
        state = dict(self.__dict__)
        state.pop("_local")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) of each of `shards` nearly equal consecutive parts of n records (deterministic)."""
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]
