"""Pictures a person would rather look at than read: image grids with captions."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxmr.data.pipeline import decode
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
