"""Evaluation batches: every image once and every caption once, in order, padded to full batches with a mask."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from jaxmr.data.images import ImageReadError, decode
from jaxmr.data.records import Source
from jaxmr.data.workers import in_workers
from jaxmr.text import Tokenizer

log = logging.getLogger(__name__)


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
    dataset = in_workers(dataset, num_workers)
    for batch in _pad_batches(iter(dataset), batch_size):
        valid = batch.pop("valid") & batch["mask"]
        if stats is not None:
            stats.n_images += int(batch["mask"].sum())
            stats.unreadable_images.extend(batch["index"][batch["mask"] & ~valid].tolist())
        batch["mask"] = valid
        yield batch


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
