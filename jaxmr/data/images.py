"""Images from any record or upload: decoding with clear errors, resizing, the central square and random-resized
crops. Images leave as uint8 (4x less to move than float32); the model normalises on the device."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxmr.data.records import DataError


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
