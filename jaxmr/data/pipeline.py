"""The grain input pipeline: random-access source -> batches of global `jax.Array`s sharded over the mesh.

Training:   source -> shuffle (seeded, new order each epoch) -> decode + resize / random-resized-crop (keyed
            by global position) -> one random caption per image, tokenized -> this process's rows of each
            global batch -> batch, dropping unreadable images  [all of this in worker processes, when there
            are workers]
            -> warn and count the unreadable images -> global arrays  [main process]
Evaluation: every image once and every caption once, in order, padded to full batches with a mask.

Images leave the pipeline as uint8 (4x less to move than float32); the model normalises on the device.
Never a horizontal flip: captions say "left of".
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

from jaxmr.data.records import DataError, Source
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


class ImageReadError(DataError):
    """An image that cannot be read or decoded; names the file."""


def _describe(image: Any) -> str:
    return image if isinstance(image, str) else f"<{type(image).__name__}>"


def load_image(image: np.ndarray | bytes | str, min_side: int = 0) -> Image.Image:
    """An RGB PIL image from pixels, encoded bytes or a path. JPEGs decode at reduced scale (`draft`) when
    `min_side` allows it, which is several times faster for large photos."""
    try:
        if isinstance(image, np.ndarray):
            array = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
            return Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8))
        pil = Image.open(io.BytesIO(image) if isinstance(image, bytes) else Path(image))
        if min_side and pil.format == "JPEG":
            pil.draft("RGB", (min_side, min_side))
        return pil.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise ImageReadError(f"cannot read image {_describe(image)}: {e}") from e


def center_square(pil: Image.Image, size: int) -> np.ndarray:
    """Shorter side to `size`, then the central square (CLIP's evaluation transform)."""
    w, h = pil.size
    if (w, h) == (size, size):
        return np.asarray(pil)
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0))


def _random_resized_crop(pil: Image.Image, size: int, scale: tuple[float, float], rng: np.random.Generator):
    """Inception-style crop: area fraction in `scale`, aspect ratio in [3/4, 4/3]; center square fallback."""
    w, h = pil.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch)))
    return center_square(pil, size)


def decode(image: Any, size: int, crop_scale=(1.0, 1.0), rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 [size, size, 3] from any image a record may hold."""
    if isinstance(image, np.ndarray) and image.shape == (size, size, 3) and crop_scale == (1.0, 1.0):
        return image.astype(np.uint8, copy=False)
    crop = crop_scale != (1.0, 1.0) and rng is not None
    pil = load_image(image, min_side=int(size / math.sqrt(crop_scale[0])) if crop else size)
    return _random_resized_crop(pil, size, crop_scale, rng) if crop else center_square(pil, size)


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


def _flags_parsed() -> None:
    # grain reads absl flags in its workers; a library must not require the caller to parse them.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _quiet_grain_teardown(worker_index: int = 0, worker_count: int = 1) -> None:
    """grain's prefetch iterators close themselves in `__del__`, which fails harmlessly while the
    interpreter is tearing down (module globals already None) and prints a traceback per iterator.
    Silence exactly that case; every other unraisable exception is still printed."""
    import sys

    default_hook = sys.unraisablehook
    if getattr(default_hook, "_jaxmr_quiet", False):
        return

    def hook(unraisable) -> None:
        teardown = isinstance(unraisable.exc_value, AttributeError) and "NoneType" in str(unraisable.exc_value)
        if not (teardown and "DatasetIterator.__del__" in repr(unraisable.object)):
            default_hook(unraisable)

    hook._jaxmr_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _in_workers(dataset: grain.IterDataset, num_workers: int, buffer_size: int = 2) -> grain.IterDataset:
    """Runs everything upstream of this point in `num_workers` processes (none: unchanged)."""
    if num_workers <= 0:
        return dataset
    _flags_parsed()
    _quiet_grain_teardown()
    options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer_size)
    return dataset.mp_prefetch(options, worker_init_fn=_quiet_grain_teardown)


def data_sharding(mesh: jax.sharding.Mesh, axes: str | tuple[str, ...] = "data") -> jax.sharding.NamedSharding:
    """Batch dimension split over `axes` of `mesh`, everything else replicated."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays sharded over the data axis."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


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
    dataset = _in_workers(dataset, config.num_workers, config.worker_buffer_size)
    return TrainIterator(dataset, data_sharding(mesh, data_axes) if mesh is not None else None)


# ---------------------------------------------------------------------------------------------- evaluation


class EvalImage(grain.transforms.Map):
    """Record index -> {image, valid}; an unreadable image gives zeros and valid=False (warned).

    `view` > 0 gives an augmented view instead of the plain resize: a random resized crop (area in `crop_scale`)
    flipped left-right half the time, the same for the same (seed, view, index) — cached LiT features use them."""

    def __init__(self, source: Source, image_size: int, strict: bool = False, view: int = 0,
                 crop_scale: tuple[float, float] = (1.0, 1.0), seed: int = 0):  # fmt: skip
        self.source, self.image_size, self.strict = source, image_size, strict
        self.view, self.crop_scale, self.seed = view, crop_scale, seed

    def _decode(self, image: Any, index: int) -> np.ndarray:
        if self.view == 0:
            return decode(image, self.image_size)
        rng = np.random.default_rng([self.seed, self.view, index])
        pixels = decode(image, self.image_size, self.crop_scale, rng)
        return pixels[:, ::-1] if rng.random() < 0.5 else pixels

    def map(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        try:
            image, valid = self._decode(record["image"], index), True
        except ImageReadError as e:
            if self.strict:
                raise
            log.warning("evaluation: %s", e)
            image, valid = np.zeros((self.image_size, self.image_size, 3), np.uint8), False
        return {"image": image, "valid": valid, "index": np.int32(index)}


def _pad_batches(elements: Iterator[dict[str, Any]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Stacks elements into batches of exactly `batch_size`; `mask` is False on the padding rows."""
    chunk: list[dict[str, Any]] = []
    for element in elements:
        chunk.append(element)
        if len(chunk) == batch_size:
            yield _stack(chunk, batch_size)
            chunk = []
    if chunk:
        yield _stack(chunk, batch_size)


def _stack(chunk: list[dict[str, Any]], batch_size: int) -> dict[str, np.ndarray]:
    out = {}
    for key in chunk[0]:
        values = np.stack([np.asarray(c[key]) for c in chunk])
        pad = np.zeros((batch_size - len(chunk), *values.shape[1:]), values.dtype)
        out[key] = np.concatenate([values, pad])
    out["mask"] = np.arange(batch_size) < len(chunk)
    return out


@dataclasses.dataclass
class EvalStats:
    n_images: int = 0
    n_captions: int = 0
    unreadable_images: list[int] = dataclasses.field(default_factory=list)


def eval_image_batches(
    source: Source,
    image_size: int,
    batch_size: int,
    num_workers: int = 0,
    strict: bool = False,
    stats: EvalStats | None = None,
    view: int = 0,
    crop_scale: tuple[float, float] = (1.0, 1.0),
    seed: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Every image once, in source order: image uint8 [B, S, S, 3], index int32 [B], mask bool [B]
    (False on padding rows and on unreadable images, whose indices go to `stats.unreadable_images`).
    `view` > 0: augmented views (see `EvalImage`)."""
    transform = EvalImage(source, image_size, strict, view, crop_scale, seed)
    dataset = grain.MapDataset.range(len(source)).map(transform).to_iter_dataset()
    dataset = _in_workers(dataset, num_workers)
    for batch in _pad_batches(iter(dataset), batch_size):
        valid = batch.pop("valid") & batch["mask"]
        if stats is not None:
            stats.n_images += int(batch["mask"].sum())
            stats.unreadable_images.extend(batch["index"][batch["mask"] & ~valid].tolist())
        batch["mask"] = valid
        yield batch


def caption_table(source: Source) -> tuple[list[str], np.ndarray]:
    """Every caption of the source in order, and for each the index of its image: (texts, int32 [C])."""
    texts, owners = [], []
    for i in range(len(source)):
        captions = source.captions(i)
        texts.extend(captions)
        owners.extend([i] * len(captions))
    return texts, np.asarray(owners, np.int32)


def eval_caption_batches(
    texts: list[str],
    owners: np.ndarray,
    tokenizer: Tokenizer,
    batch_size: int,
    stats: EvalStats | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Every caption once, in order: text int32 [B, L], image_index int32 [B], mask bool [B]."""
    if stats is not None:
        stats.n_captions += len(texts)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        elements = [
            {"text": t, "image_index": o}
            for t, o in zip(tokenizer.encode(chunk), owners[start : start + batch_size], strict=True)
        ]
        yield _stack(elements, batch_size)
