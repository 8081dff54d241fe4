"""A write-ahead log for index writes: each acknowledged write is one checksummed record, fsynced before the reply.

An add or a delete appends a record of its own size (the vectors, ids and metadata rows it carries) instead of
committing a whole new version of the index; opening the index replays the log over the base version it names
(`jaxmr.index.store`), and compaction folds it into a new base and starts that base's log with the writes that
arrived meanwhile (`write_log`). Sequence numbers go on across compactions: they count the index's writes.

File layout: `MAGIC` (8 bytes), the base version and the first record's sequence number (u64 little-endian
each), then records. A record is
`u32 payload length | u32 crc32(payload) | payload`; a payload is `u32 header length | header JSON | arrays`,
the header naming the operation, the sequence number, the metadata and each array's name, dtype and shape (the
arrays follow in that order, C-contiguous).

Reading stops at the first record that is not whole: a record cut short by the end of the file, or the file's
last record with a bad checksum, is a **torn tail** (a crash during its append, so never acknowledged) and is
dropped, never applied half; `repair()` truncates it. A bad record with more data after it is corruption, not a
crash, and raises `CorruptLogError`: later records were acknowledged, and skipping one would lose it silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from jaxmr.index.ann import InvalidIndexError

MAGIC = b"JXMRWAL1"
_HEADER = struct.Struct("<8sQQ")  # magic, base version, sequence number of the first record
_RECORD = struct.Struct("<II")  # payload length, crc32
_U32 = struct.Struct("<I")
MAX_RECORD = 1 << 30  # a length beyond this is garbage, not a record


class CorruptLogError(InvalidIndexError):
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


START = _HEADER.size  # the offset of a log's first record


class WriteAheadLog:
    """The log at `path` over base version `base` (created if absent and `create`, numbering its records from
    `first_seq`). `append` is durable when it returns. Opening checks only the header; `read` scans records (a
    reader follows a writer's appends by reading on from where it stopped). Appending is for the one writer that
    holds the index's writer lock."""

    def __init__(self, path: str | os.PathLike, base: int, create: bool = True, first_seq: int = 0):
        self.path, self.base = Path(path), int(base)
        if create and not self.path.exists():
            write_log(self.path, self.base, [], first_seq)
        with self.path.open("rb") as f:
            magic, found, self.first_seq = _HEADER.unpack(f.read(_HEADER.size).ljust(_HEADER.size, b"\0"))
        if magic != MAGIC:
            raise CorruptLogError(f"{self.path} is not a jaxmr write-ahead log")
        if found != self.base:
            raise CorruptLogError(f"{self.path} logs writes over version {found}, not {self.base}")
        self._end: int | None = None  # the offset after the last whole record, once read
        self._torn = 0
        self._next = self.first_seq

    def read(self, start: int = START) -> tuple[list[Entry], int]:
        """The whole records from byte `start` (a record boundary: START or an offset `read` returned) to the end,
        and the offset after the last of them. A torn tail is left out (a writer's append in progress looks the
        same to another process: it is read whole next time)."""
        with self.path.open("rb") as f:
            f.seek(start)
            data = f.read()
        entries, at = [], 0
        while at < len(data):
            if len(data) - at < _RECORD.size:
                break  # a length and checksum cut short: torn
            size, crc = _RECORD.unpack_from(data, at)
            end = at + _RECORD.size + size
            if size > MAX_RECORD or end > len(data):
                if size > MAX_RECORD and end <= len(data):
                    raise CorruptLogError(f"{self.path}: a record at byte {start + at} claims {size} bytes")
                break  # runs past the end of the file: torn
            payload = data[at + _RECORD.size : end]
            if zlib.crc32(payload) != crc:
                if end == len(data):
                    break  # the last record, damaged: torn
                raise CorruptLogError(
                    f"{self.path}: the record at byte {start + at} fails its checksum and more follow"
                )
            entries.append(decode(payload))
            at = end
        self._end, self._torn = start + at, len(data) - at
        if entries:
            self._next = entries[-1].seq + 1
        elif start == START:
            self._next = self.first_seq
        return entries, start + at

    def entries(self) -> list[Entry]:
        """Every whole record, in order (the torn tail, if any, left out)."""
        return self.read()[0]

    @property
    def torn_bytes(self) -> int:
        if self._end is None:
            self.read()
        return self._torn

    @property
    def size(self) -> int:
        """Bytes of the log up to its last whole record."""
        if self._end is None:
            self.read()
        return self._end

    @property
    def next_seq(self) -> int:
        """The sequence number the next append gets (valid once the log was read to its end)."""
        return self._next

    def repair(self) -> int:
        """Truncates a torn tail (bytes dropped); appends do this first anyway."""
        if self._end is None:
            self.read()
        dropped = self._torn
        if dropped:
            with self.path.open("r+b") as f:
                f.truncate(self._end)
                f.flush()
                os.fsync(f.fileno())
            self._torn = 0
        return dropped

    def append(self, op: str, meta: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None) -> Entry:
        """Writes one record and fsyncs it: once this returns, a crash cannot lose it. Returns the entry. The log
        must have been read to its end first (what the writer's state holds): a log that grew since is refused,
        since appending at a stale end would overwrite another writer's records."""
        self.repair()
        entry = Entry(self._next, op, dict(meta or {}), dict(arrays or {}))
        record = encode(entry)
        with self.path.open("r+b") as f:
            if os.fstat(f.fileno()).st_size != self._end:
                raise RuntimeError(f"{self.path} changed since it was read: read it before appending")
            f.seek(self._end)
            try:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
            except BaseException:  # not acknowledged: it must not come back on the next open either
                with contextlib.suppress(OSError):
                    f.truncate(self._end)
                    os.fsync(f.fileno())
                raise
        self._end += len(record)
        self._next += 1
        return entry


def write_log(path: str | os.PathLike, base: int, entries: list[Entry], first_seq: int = 0) -> int:
    """Writes a new log over `base` holding `entries` (their sequence numbers kept; numbering starts at
    `first_seq` when there are none) in place of `path`, atomically and durably (a temporary file fsynced,
    renamed, the folder fsynced). Returns its size."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    first = entries[0].seq if entries else int(first_seq)
    data = _HEADER.pack(MAGIC, int(base), first) + b"".join(encode(e) for e in entries)
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return len(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
