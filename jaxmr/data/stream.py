"""Streaming over shards too large to index or convert: each process reads its own shards in order through a
shuffle buffer, epoch after epoch, and resumes at exactly the next batch.

Units are a tar shard (`wds:`) or a parquet row group (`parquet:`). Epoch e visits every unit once, in an order
drawn from (seed, e); process p of P takes units p, p + P, ... of that order, so the processes read disjoint
units and together every sample once per epoch. Samples go through a shuffle buffer (`buffer` samples; each new
one replaces a randomly drawn one, which is emitted). The state — epoch, unit and position in it (a tar
header's byte offset, a row), the buffer's samples as (unit, position) references, the buffer RNG's state, the
counts — is a small dict saved in the checkpoint: a restart re-reads the buffered samples by reference and
continues with the identical next batch. Augmentation is keyed by (seed, epoch, unit, position), not by order.

Unlike `wds:` as a random-access source this reads no shard before it needs it (no index of every shard up
front) and reads each shard front to back; the price is a local shuffle (the buffer) instead of a global one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from jaxmr.data.images import ImageReadError, decode
from jaxmr.data.records import DataError
from jaxmr.data.shards import (
    CAPTION_EXTS,
    IMAGE_EXTS,
    _split_name,
    expand,
    json_caption,
    parquet_arg,
    parquet_columns,
    row_captions,
    row_image,
)  # fmt: skip
from jaxmr.sharding import data_sharding, to_global
from jaxmr.text import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    batch_size: int = 256  # global, over all processes
    image_size: int = 64
    seed: int = 0
    crop_scale: tuple[float, float] = (1.0, 1.0)
    buffer: int = 1000  # shuffle buffer, samples per process
    num_epochs: int | None = None  # None: forever
    read_threads: int = 4  # decoding threads per process
    resampled: bool = False  # each process draws units with replacement (OpenCLIP's --dataset-resampled)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.image_size < 1 or self.buffer < 1 or self.read_threads < 1:
            raise ValueError("batch_size, image_size, buffer and read_threads must be positive")


# ------------------------------------------------------------------------------------------------ units


class TarUnits:
    """Tar shards as units; a position is the byte offset of a sample's first tar header."""

    def __init__(self, pattern: str):
        self.paths = expand(pattern, (".tar",))
        self.name = f"wds:{pattern}"

    def __len__(self) -> int:
        return len(self.paths)

    def read_from(self, unit: int, position: int) -> Iterator[tuple[int, int, dict[str, Any] | str]]:
        """(position, the next sample's position, the sample or the reason it is unusable) for each sample from
        `position` on; a damaged or cut-off tail is one last "truncated shard" item."""
        with open(self.paths[unit], "rb") as f:
            f.seek(position)
            members: dict[str, bytes] = {}
            key, start = None, position
            try:
                tar = tarfile.TarFile(fileobj=f, mode="r")  # continues from the file's position
                for member in tar:
                    if not member.isfile():
                        continue
                    name, ext = _split_name(member.name)
                    if key is not None and name != key:
                        yield start, member.offset, _sample(members, key)
                        members, start = {}, member.offset
                    key = name
                    members[ext] = tar.extractfile(member).read()
                end = tar.offset  # past the last member: resuming there reads nothing more
            except (tarfile.TarError, OSError, EOFError) as e:
                log.warning("%s: damaged or cut off after offset %d (%s): the rest of it is skipped", self.paths[unit],
                            start, e)  # fmt: skip
                yield start, f.seek(0, 2), "truncated shard (its tail)"
                return
            if key is not None:
                yield start, end, _sample(members, key)

    def read_at(self, unit: int, position: int) -> dict[str, Any] | str:
        return next(self.read_from(unit, position))[2]


def _sample(members: dict[str, bytes], key: str) -> dict[str, Any] | str:
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    caption = next((members[e].decode("utf-8", "replace").strip() for e in CAPTION_EXTS if e in members), None)
    if caption is None and "json" in members:
        caption = json_caption(members["json"])
    if image is None:
        return "no image"
    if not caption:
        return "no caption"
    return {"image": image, "captions": [caption], "key": key}


class ParquetUnits:
    """Parquet row groups as units; a position is a row of the group."""

    def __init__(self, pattern: str, image: str | None = None, caption: str | None = None):
        self.files = expand(pattern, (".parquet",))
        self.name = f"parquet:{pattern}"
        self.units, self.columns = [], []
        for f, path in enumerate(self.files):
            meta = pq.ParquetFile(path)
            self.columns.append(parquet_columns(meta.schema_arrow, image, caption, path))  # as random access finds them
            self.units += [(f, g) for g in range(meta.num_row_groups)]

    def __len__(self) -> int:
        return len(self.units)

    def read_from(self, unit: int, position: int) -> Iterator[tuple[int, int, dict[str, Any] | str]]:
        f, g = self.units[unit]
        image_col, caption_col = self.columns[f]
        table = pq.ParquetFile(self.files[f]).read_row_group(g, columns=[image_col, caption_col])
        images, texts = table[image_col].to_pylist(), table[caption_col].to_pylist()
        for r in range(position, len(images)):
            image, found = row_image(images[r]), row_captions(texts[r])
            yield r, r + 1, ({"image": image, "captions": found, "key": f"{f}:{g}:{r}"} if image and found else
                             "no image" if not image else "no caption")  # fmt: skip

    def read_at(self, unit: int, position: int) -> dict[str, Any] | str:
        return next(self.read_from(unit, position))[2]


def stream_units(spec: str) -> TarUnits | ParquetUnits:
    """The units of a `wds:` or `parquet:` spec (DataError for any other kind)."""
    kind, _, arg = spec.strip().partition(":")
    if kind == "wds":
        return TarUnits(arg)
    if kind == "parquet":
        return ParquetUnits(*parquet_arg(arg))
    raise DataError(f"streaming reads wds: or parquet: shards, not {spec!r}")


class CaptionSample:
    """The first `n` captions of a stream's units in order, as a source of captions only (what a BPE tokenizer
    learns from without reading every shard)."""

    def __init__(self, units, n: int = 100_000):
        self.name, self.split, self._captions = units.name, "train", []
        for unit in range(len(units)):
            for _, _, sample in units.read_from(unit, 0):
                if not isinstance(sample, str):
                    self._captions.append(sample["captions"])
                if len(self._captions) >= n:
                    return

    def __len__(self) -> int:
        return len(self._captions)

    def captions(self, index: int) -> list[str]:
        return list(self._captions[index])


# ------------------------------------------------------------------------------------------- the stream

SAMPLE_BITS = 32  # a sample's id: unit << 32 | its ordinal in the unit (int64: 2^31 units of 2^32 samples)


def sample_id(unit: int, ordinal: int) -> int:
    """The stream's id of a sample: unique over every unit and sample count a source can have (int64)."""
    return (unit << SAMPLE_BITS) | ordinal


class StreamPlan:
    """Where a process is in the stream, without reading an image: the unit order of each epoch (drawn from
    (seed, epoch), or with replacement per process when `resampled`), the position inside the current unit, the
    shuffle buffer (references plus whatever the units yield for them) and its RNG. `units` needs only
    `len`, `read_from` and `read_at` (see TarUnits), so a planner over 100,000 virtual units runs in a test.

    Memory and start-up are O(units / processes) plus the buffer: one epoch's order of this process's units is
    drawn when the epoch begins, and nothing is kept per sample but the buffered ones."""

    def __init__(self, units, config: StreamConfig, process_index: int = 0, process_count: int = 1):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in 0..{process_count - 1}, got {process_index}")
        if len(units) < process_count and not config.resampled:
            raise DataError(f"{units.name}: {len(units)} units cannot give each of {process_count} processes one "
                            "(or stream them resampled)")  # fmt: skip
        if len(units) == 0:
            raise DataError(f"{units.name}: no units to stream")
        self.units, self.config = units, config
        self.process, self.processes = process_index, process_count
        self.skipped: collections.Counter = collections.Counter()
        self._orders: tuple[int, list[int]] = (-1, [])
        start = {"epoch": 0, "unit": 0, "position": 0, "ordinal": 0, "buffer": [], "rng": None}
        self.set_state({**start, "resampled": config.resampled})

    def order(self, epoch: int) -> list[int]:
        """This process's units in epoch `epoch`: units p, p + P, ... of the epoch's permutation, or, resampled,
        ceil(n / P) units drawn with replacement from (seed, process, epoch) — an epoch is then a sample count
        (about the source's size over all processes), not a pass over every unit."""
        if self._orders[0] != epoch:
            n = len(self.units)
            if self.config.resampled:
                draws = -(-n // self.processes)
                order = np.random.default_rng([self.config.seed, 7, self.process, epoch]).integers(n, size=draws)
            else:
                order = np.random.default_rng([self.config.seed, epoch]).permutation(n)[self.process :: self.processes]
            self._orders = (epoch, order.tolist())
        return self._orders[1]

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "unit": self.unit, "position": self.position, "ordinal": self.ordinal,
                "buffer": [list(ref) for ref, _ in self.buffer], "rng": self.rng.bit_generator.state,
                "skipped": dict(self.skipped), "process": self.process, "processes": self.processes,
                "resampled": self.config.resampled}  # fmt: skip

    def set_state(self, state: dict[str, Any]) -> None:
        saved = (state.get("process", self.process), state.get("processes", self.processes))
        if saved != (self.process, self.processes):  # a state is one process's position: never another's
            raise DataError(f"this stream state is process {saved[0]} of {saved[1]}'s, not process "
                            f"{self.process} of {self.processes}'s")  # fmt: skip
        if bool(state.get("resampled", False)) != self.config.resampled:
            raise DataError("this stream state was saved with data.resampled="
                            f"{bool(state.get('resampled', False))}; the run has {self.config.resampled}")  # fmt: skip
        self.epoch, self.unit, self.position, self.ordinal = (int(state[k]) for k in ("epoch", "unit", "position",
                                                                                      "ordinal"))  # fmt: skip
        self.rng = np.random.default_rng([self.config.seed, 1_000_003, self.process])
        if state["rng"] is not None:
            self.rng.bit_generator.state = state["rng"]
        # buffered samples: (unit, position, ordinal, epoch, slot) and the sample itself, re-read after a restart
        self.buffer = [(_ref(ref), self.units.read_at(ref[0], ref[1])) for ref in state["buffer"]]
        self._reader = None
        self.skipped = collections.Counter(state.get("skipped", {}))

    def _next_sample(self) -> tuple[tuple[int, ...], Any] | None:
        """The next usable sample of this process's units (None when the last epoch is done)."""
        while True:
            if self.config.num_epochs is not None and self.epoch >= self.config.num_epochs:
                return None
            order = self.order(self.epoch)
            if self.unit >= len(order):
                self.epoch, self.unit, self.position, self.ordinal, self._reader = self.epoch + 1, 0, 0, 0, None
                continue
            unit = order[self.unit]
            if self._reader is None:
                self._reader = self.units.read_from(unit, self.position)
            for position, after, sample in self._reader:
                ref = (unit, position, self.ordinal, self.epoch, self.unit)
                self.ordinal += 1
                self.position = after
                if isinstance(sample, str):
                    self.skipped[sample] += 1
                    continue
                return ref, sample
            self.unit, self.position, self.ordinal, self._reader = self.unit + 1, 0, 0, None

    def draw(self) -> tuple[tuple[int, ...], Any] | None:
        """One (reference, sample) out of the shuffle buffer (filled first), or None when the stream is done
        and drained."""
        while len(self.buffer) < self.config.buffer:
            nxt = self._next_sample()
            if nxt is None:
                break
            self.buffer.append(nxt)
        if not self.buffer:
            return None
        j = int(self.rng.integers(len(self.buffer)))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()


def _ref(ref) -> tuple[int, ...]:
    """A buffered reference as saved; states from before the slot was kept get slot -1."""
    ref = tuple(int(x) for x in ref)
    return ref if len(ref) == 5 else (*ref, -1)


class StreamIterator:
    """Training batches streamed from shard units (see the module docstring): `next()` gives image uint8
    [B, S, S, 3], text int32 [B, L] and index int32 [B] — the row of each example in the global batch, the
    loss's pair id: unique in every batch at any shard count, a sample drawn twice is a negative of itself, as
    in OpenCLIP — as global arrays with a mesh; and `sample` int64 [B_local], this process's samples'
    `sample_id`s, kept on the host (for checks; the training loop drops it). `get_state` / `set_state` resume
    at exactly the next batch."""

    def __init__(self, units, tokenizer: Tokenizer, config: StreamConfig, process_index: int = 0,
                 process_count: int = 1, mesh=None, data_axes="data"):  # fmt: skip
        if config.batch_size % process_count:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by {process_count} processes")
        self.plan = StreamPlan(units, config, process_index, process_count)
        self.units, self.tokenizer, self.config = units, tokenizer, config
        self.local_batch = config.batch_size // process_count
        self._rows = np.arange(self.local_batch, dtype=np.int32) + np.int32(process_index * self.local_batch)
        self._sharding = data_sharding(mesh, data_axes) if mesh is not None else None
        self._pool = concurrent.futures.ThreadPoolExecutor(config.read_threads)

    @property
    def skipped(self) -> collections.Counter:
        return self.plan.skipped

    def get_state(self) -> dict[str, Any]:
        return self.plan.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.plan.set_state(state)

    def _example(self, item) -> dict[str, Any] | str:
        (unit, position, ordinal, epoch, slot), sample = item
        key = [self.config.seed, epoch, unit, position]
        if self.config.resampled:  # one unit drawn twice (by one process or two) is cropped anew each time
            key += [self.plan.process, slot]
        rng = np.random.default_rng(key)
        try:
            image = decode(sample["image"], self.config.image_size, self.config.crop_scale, rng)
        except ImageReadError:
            return "undecodable image"
        caption = sample["captions"][int(rng.integers(len(sample["captions"])))]
        return {"image": image, "text": self.tokenizer.encode([caption])[0], "sample": sample_id(unit, ordinal)}

    def __iter__(self) -> StreamIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        while len(rows) < self.local_batch:
            drawn = [d for d in (self.plan.draw() for _ in range(self.local_batch - len(rows))) if d is not None]
            if not drawn:
                raise StopIteration
            for example in self._pool.map(self._example, drawn):
                if isinstance(example, str):
                    self.plan.skipped[example] += 1
                else:
                    rows.append(example)
        batch = {"image": np.stack([r["image"] for r in rows]), "text": np.stack([r["text"] for r in rows]),
                 "index": self._rows.copy()}  # fmt: skip
        samples = np.array([r["sample"] for r in rows], np.int64)
        batch = to_global(batch, self._sharding) if self._sharding is not None else batch
        batch["sample"] = samples
        return batch

    @property
    def stats(self) -> dict[str, int]:
        return {
            "skipped_images": int(sum(self.skipped.values())),
            **{f"skipped/{k}": v for k, v in self.skipped.items()},
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
