"""Pictures a person would rather look at than read: image grids with captions, result grids with scores."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxmr.data.images import decode
from jaxmr.data.records import Record


def caption_grid(
    records: Sequence[Record],
    path: str | os.PathLike,
    image_size: int = 128,
    columns: int = 4,
    lines: int = 4,
) -> None:
    """Saves a PNG grid: each record's image with its first caption (or its id) underneath."""
    if not records:
        raise ValueError("caption_grid needs at least one record")
    font = ImageFont.load_default()
    line_height = 12
    text_height = lines * line_height + 6
    rows = -(-len(records) // columns)
    sheet = Image.new("RGB", (columns * image_size, rows * (image_size + text_height)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    chars = max(8, image_size // 6)
    for k, record in enumerate(records):
        x, y = (k % columns) * image_size, (k // columns) * (image_size + text_height)
        try:
            tile = decode(record["image"], image_size)
        except ValueError:
            tile = np.full((image_size, image_size, 3), 200, np.uint8)
        sheet.paste(Image.fromarray(tile), (x, y))
        text = record["captions"][0] if record["captions"] else record["id"]
        for i, line in enumerate(textwrap.wrap(text, chars)[:lines]):
            draw.text((x + 3, y + image_size + 3 + i * line_height), line, fill=(20, 20, 20), font=font)
    sheet.save(path)


def result_grid(
    images: Sequence,
    labels: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
    correct: Sequence[bool] | None = None,
    image_size: int = 112,
    columns: int = 5,
) -> None:
    """Saves a PNG grid of search results: each image (anything `decode` reads) with its label (e.g. rank and
    score) underneath, an optional title line on top, and a green / red frame where `correct` is given."""
    if not images or len(images) != len(labels):
        raise ValueError(f"result_grid needs images and as many labels ({len(images)} and {len(labels)})")
    font = ImageFont.load_default()
    pad, text_height, head = 4, 14, 18 if title else 0
    cell = image_size + 2 * pad
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell, head + rows * (cell + text_height)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 3), textwrap.shorten(title, columns * cell // 6), fill=(0, 0, 0), font=font)
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (k % columns) * cell, head + (k // columns) * (cell + text_height)
        if correct is not None:
            colour = (40, 170, 60) if correct[k] else (210, 50, 50)
            draw.rectangle([x + 1, y + 1, x + cell - 2, y + cell - 2], outline=colour, width=pad - 1)
        try:
            tile = decode(image, image_size)
        except ValueError:
            tile = np.full((image_size, image_size, 3), 200, np.uint8)
        sheet.paste(Image.fromarray(tile), (x + pad, y + pad))
        draw.text((x + pad, y + cell), textwrap.shorten(label, image_size // 6), fill=(20, 20, 20), font=font)
    sheet.save(path)
