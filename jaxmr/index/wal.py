"""A write-ahead log for index writes: each acknowledged write is one checksummed record, fsynced before the reply.

The first piece of "index writes that cost what they change" (issue 27): an add or a delete appends a record of
its own size (the vectors, ids and metadata rows it carries) instead of committing a whole new version; a later
open replays the log over the base version it names. Not yet wired into `Searcher` (segments, the delta search
and compaction come next); tested on its own.

File layout: `MAGIC` (8 bytes), the base version (u64 little-endian), then records. A record is
`u32 payload length | u32 crc32(payload) | payload`; a payload is `u32 header length | header JSON | arrays`,
the header naming the operation, the sequence number, the metadata and each array's name, dtype and shape (the
arrays follow in that order, C-contiguous).

Reading stops at the first record that is not whole: a record cut short by the end of the file, or the file's
last record with a bad checksum, is a **torn tail** (a crash during its append, so never acknowledged) and is
dropped, never applied half; `repair()` truncates it. A bad record with more data after it is corruption, not a
crash, and raises `CorruptLogError`: later records were acknowledged, and skipping one would lose it silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"JXMRWAL1"
_HEADER = struct.Struct("<8sQ")  # magic, base version
_RECORD = struct.Struct("<II")  # payload length, crc32
_U32 = struct.Struct("<I")
MAX_RECORD = 1 << 30  # a length beyond this is garbage, not a record


class CorruptLogError(ValueError):
    """A log whose damage is not a torn last append: it cannot be replayed without losing acknowledged writes."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One logged write: `op` ("add", "delete", ...), its sequence number, JSON metadata and named arrays."""

    seq: int
    op: str
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


def encode(entry: Entry) -> bytes:
    """The record bytes of `entry` (length, checksum, payload)."""
    arrays = {name: np.ascontiguousarray(a) for name, a in entry.arrays.items()}
    header = {"seq": entry.seq, "op": entry.op, "meta": entry.meta,
              "arrays": [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]}  # fmt: skip
    head = json.dumps(header, separators=(",", ":")).encode()
    payload = b"".join([_U32.pack(len(head)), head, *(a.tobytes() for a in arrays.values())])
    return _RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def decode(payload: bytes) -> Entry:
    (size,) = _U32.unpack_from(payload)
    header = json.loads(payload[4 : 4 + size])
    arrays, at = {}, 4 + size
    for name, dtype, shape in header["arrays"]:
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise CorruptLogError(f"array {name!r} has an object dtype")
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(payload, dt, count, at).reshape(shape).copy()
        at += count * dt.itemsize
    if at != len(payload):
        raise CorruptLogError("a record's arrays do not fill its payload")
    return Entry(header["seq"], header["op"], header["meta"], arrays)


class WriteAheadLog:
    """The log at `path` over base version `base` (created if absent). `append` is durable when it returns."""

    def __init__(self, path: str | os.PathLike, base: int):
        self.path, self.base = Path(path), int(base)
        if not self.path.exists():
            self._create()
        with self.path.open("rb") as f:
            magic, found = _HEADER.unpack(f.read(_HEADER.size).ljust(_HEADER.size, b"\0"))
        if magic != MAGIC:
            raise CorruptLogError(f"{self.path} is not a jaxmr write-ahead log")
        if found != self.base:
            raise CorruptLogError(f"{self.path} logs writes over version {found}, not {self.base}")
        entries, self._end, self._torn = self._scan()
        self._next = entries[-1].seq + 1 if entries else 0

    def _create(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with tmp.open("wb") as f:
            f.write(_HEADER.pack(MAGIC, self.base))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

    def _scan(self) -> tuple[list[Entry], int, int]:
        """(whole entries, the offset after the last one, bytes of torn tail after it)."""
        data = self.path.read_bytes()
        entries, at = [], _HEADER.size
        while at < len(data):
            if len(data) - at < _RECORD.size:
                break  # a length and checksum cut short: torn
            size, crc = _RECORD.unpack_from(data, at)
            end = at + _RECORD.size + size
            if size > MAX_RECORD or end > len(data):
                if size > MAX_RECORD and end <= len(data):
                    raise CorruptLogError(f"{self.path}: a record at byte {at} claims {size} bytes")
                break  # runs past the end of the file: torn
            payload = data[at + _RECORD.size : end]
            if zlib.crc32(payload) != crc:
                if end == len(data):
                    break  # the last record, damaged: torn
                raise CorruptLogError(f"{self.path}: the record at byte {at} fails its checksum and more follow")
            entries.append(decode(payload))
            at = end
        return entries, at, len(data) - at

    def entries(self) -> list[Entry]:
        """Every whole record, in order (the torn tail, if any, left out)."""
        return self._scan()[0]

    @property
    def torn_bytes(self) -> int:
        return self._torn

    @property
    def size(self) -> int:
        return self._end

    def repair(self) -> int:
        """Truncates a torn tail (bytes dropped); appends do this first anyway."""
        dropped = self._torn
        if dropped:
            with self.path.open("r+b") as f:
                f.truncate(self._end)
                f.flush()
                os.fsync(f.fileno())
            self._torn = 0
        return dropped

    def append(self, op: str, meta: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None) -> Entry:
        """Writes one record and fsyncs it: once this returns, a crash cannot lose it. Returns the entry."""
        self.repair()
        entry = Entry(self._next, op, dict(meta or {}), dict(arrays or {}))
        record = encode(entry)
        with self.path.open("r+b") as f:
            f.seek(self._end)
            f.write(record)
            f.flush()
            os.fsync(f.fileno())
        self._end += len(record)
        self._next += 1
        return entry


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
