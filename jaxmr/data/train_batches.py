"""The grain training pipeline: random-access source -> batches of global `jax.Array`s sharded over the mesh.

Training:   source -> shuffle (seeded, new order each epoch) -> decode + resize / random-resized-crop (keyed
            by global position) -> one random caption per image, tokenized -> this process's rows of each
            global batch -> batch, dropping unreadable images  [all of this in worker processes, when there
            are workers]
            -> warn and count the unreadable images -> global arrays  [main process]

Images leave the pipeline as uint8 (4x less to move than float32); the model normalises on the device. This
training pipeline never flips an image horizontally, since the shapes world's captions say "left of"; the
augmented views that LiT caches for photos (`jaxmr.data.eval_batches`, view > 0) do flip half the time.
Evaluation batches are in `jaxmr.data.eval_batches`."""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

import grain
import jax
import numpy as np

from jaxmr.data.images import ImageReadError, decode
from jaxmr.data.records import DataError, Source
from jaxmr.data.workers import in_workers
from jaxmr.sharding import data_sharding, to_global
from jaxmr.text import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 256  # global batch size, over all processes
    image_size: int = 64  # square side the images are resized / cropped to
    seed: int = 0  # shuffle order, crops and caption choice derive from it
    num_epochs: int | None = None  # None: repeat forever
    crop_scale: tuple[float, float] = (1.0, 1.0)  # random-resized-crop area range; (1, 1) = resize only
    num_workers: int = 0  # grain worker processes; 0 decodes in the main process
    worker_buffer_size: int = 2  # batches each worker keeps ready
    read_threads: int = 4  # threads decoding ahead in each process (grain's default of 16 starves XLA on 2 cores)
    strict: bool = False  # raise on an unreadable image instead of skipping it
    shuffle_group: int = 1  # shuffle runs of this many consecutive records as units (shapes: 2 keeps twins together)
    # > 1: each image comes with this many of its captions (distinct when it has that many), text [k, L]; the
    # batch is still batch_size images
    captions_per_image: int = 1

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.batch_size < 1 or self.image_size < 1 or self.num_workers < 0 or self.shuffle_group < 1:
            raise ValueError("batch_size, image_size and shuffle_group must be positive and num_workers >= 0")
        if self.captions_per_image < 1:
            raise ValueError(f"captions_per_image must be at least 1, got {self.captions_per_image}")


class Ungroup(grain.MapDataset):
    """Group ids -> record indices: element k is record group * size + k % size of group parent[k // size]."""

    def __init__(self, parent: grain.MapDataset, size: int):
        super().__init__(parent)
        self._size = size

    def __len__(self) -> int:
        return min(len(self._parent) * self._size, sys.maxsize)  # a repeat-forever parent is sys.maxsize long

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[index // self._size] * self._size + index % self._size

    def __str__(self) -> str:
        return f"Ungroup(size={self._size})"


class ProcessRows(grain.MapDataset):
    """One process's share of every global batch: element j is row `index * local + j % local` of global batch
    `j // local` (local = batch_size / count), so process p holds rows [p * local, (p + 1) * local)."""

    def __init__(self, parent: grain.MapDataset, batch_size: int, index: int, count: int):
        super().__init__(parent)
        self._batch, self._local, self._index = batch_size, batch_size // count, index

    def __len__(self) -> int:
        return min(len(self._parent) // self._batch * self._local, sys.maxsize)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local)
        return self._parent[batch * self._batch + self._index * self._local + row]

    def __str__(self) -> str:
        return f"ProcessRows(batch={self._batch}, rows {self._index * self._local}..+{self._local})"


class TrainExample(grain.transforms.RandomMap):
    """Record -> {image, text, index} with a random crop and one random caption (text [L]), or k of them (text
    [k, L], distinct when the image has k) when captions_per_image = k > 1; or {error} when the image cannot be
    read (dropped and counted in the main process, where the count is kept)."""

    def __init__(self, source: Source, tokenizer: Tokenizer, config: PipelineConfig):
        self.source, self.tokenizer, self.config = source, tokenizer, config

    def random_map(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        record = self.source[index]
        if not record["captions"]:
            raise DataError(f"{self.source.name}: image {record['id']} has no captions; training needs captions")
        captions, k = record["captions"], self.config.captions_per_image
        chosen = [int(rng.integers(len(captions)))] if k == 1 else rng.choice(len(captions), k, len(captions) < k)
        try:
            image = decode(record["image"], self.config.image_size, self.config.crop_scale, rng)
        except ImageReadError as e:
            if self.config.strict:
                raise
            return {"error": str(e)}
        tokens = self.tokenizer.encode([captions[int(c)] for c in chosen])
        return {"image": image, "text": tokens[0] if k == 1 else tokens, "index": np.int32(index)}


class ReadableBatches(grain.IterDataset):
    """Batches of `batch_size` examples whose image could be read. The examples that failed are dropped
    and their messages travel with the batch (`unreadable`), so the count is exact even when batches are
    assembled in worker processes, and a batch crosses the process boundary once, not row by row."""

    def __init__(self, parent: grain.IterDataset, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __iter__(self) -> grain.DatasetIterator:
        return _ReadableBatchIterator(self._parent.__iter__(), self._batch_size)


class _ReadableBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __next__(self) -> dict[str, Any]:
        rows, unreadable = [], []
        while len(rows) < self._batch_size:  # StopIteration drops an incomplete last batch
            element = next(self._parent)
            (unreadable.append(element["error"]) if "error" in element else rows.append(element))
        batch: dict[str, Any] = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
        batch["unreadable"] = unreadable
        return batch

    # Batches end exactly where the parent's state is taken, so the parent's state is the whole state.
    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class TrainIterator:
    """Batches for training: `next()` gives a dict image uint8 [B, S, S, 3], text int32 [B, L] (or [B, k, L] with k
    captions per image), index int32 [B]
    (global jax.Arrays when a mesh is given, numpy otherwise). Its state (`get_state` / `set_state`) is a
    small dict that resumes at exactly the next batch."""

    def __init__(self, dataset: grain.IterDataset, sharding=None):
        self._sharding = sharding
        self._iter = iter(dataset)
        self.skipped_images = 0

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._iter)
        for message in batch.pop("unreadable"):
            self.skipped_images += 1
            log.warning("skipping unreadable image (%d so far): %s", self.skipped_images, message)
        return to_global(batch, self._sharding) if self._sharding is not None else batch

    @property
    def stats(self) -> dict[str, int]:
        return {"skipped_images": self.skipped_images}

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._iter.get_state(), "skipped_images": self.skipped_images}

    def set_state(self, state: dict[str, Any]) -> None:
        self._iter.set_state(state["grain"])
        self.skipped_images = int(state.get("skipped_images", 0))

    def close(self) -> None:
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()


def train_iterator(
    source: Source,
    tokenizer: Tokenizer,
    config: PipelineConfig,
    mesh: jax.sharding.Mesh | None = None,
    data_axes: str | tuple[str, ...] = "data",
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """The training pipeline over `source` (see the module docstring); each process reads its own slice."""
    if len(source) == 0:
        raise DataError(f"{source.name}: the split is empty")
    if len(source) >= 2**31:  # the record's index is the loss's pair id (int32 on the device)
        raise DataError(f"{source.name}: {len(source)} records is more than random access numbers (2^31); "
                        "stream it (data.stream_buffer > 0, optionally data.resampled)")  # fmt: skip
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if config.batch_size % process_count:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {process_count} processes")
    group = config.shuffle_group
    if len(source) < group:
        raise DataError(f"{source.name}: {len(source)} records cannot fill one shuffle group of {group}")
    dataset = grain.MapDataset.range(len(source) // group).seed(config.seed).shuffle().repeat(config.num_epochs)
    if group > 1:  # hard negatives stored side by side stay side by side (a trailing partial group is left out)
        dataset = Ungroup(dataset, group)
    # Augmentation is keyed by the global position, and each process takes its own rows of every global batch:
    # the processes together read exactly the batches one process would, in the same order.
    dataset = dataset.random_map(TrainExample(source, tokenizer, config))
    local_batch = config.batch_size // process_count
    if process_count > 1:
        dataset = ProcessRows(dataset, config.batch_size, process_index, process_count)
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=2 * local_batch)
    dataset = dataset.to_iter_dataset(read)
    dataset = ReadableBatches(dataset, local_batch)
    dataset = in_workers(dataset, config.num_workers, config.worker_buffer_size)
    return TrainIterator(dataset, data_sharding(mesh, data_axes) if mesh is not None else None)
