"""Untrusted uploads: size and pixel limits checked before decoding, clear 400/413 errors."""

from __future__ import annotations

import io

from PIL import Image

from jaxmr.serving.settings import Settings


class BadRequest(ValueError):
    """Client input the server refuses (a 400), with a message meant for the client."""


class TooLarge(BadRequest):
    """An upload over the size limits (a 413)."""


def decode_upload(data: bytes, settings: Settings) -> Image.Image:
    """Untrusted bytes -> an RGB image, checked against the byte and pixel limits before decoding."""
    if len(data) > settings.max_upload_bytes:
        raise TooLarge(f"image of {len(data)} bytes is over the limit of {settings.max_upload_bytes} bytes")
    if not data:
        raise BadRequest("the image is empty")
    try:
        pil = Image.open(io.BytesIO(data))  # reads the header only
        if pil.width * pil.height > settings.max_pixels:
            raise TooLarge(f"image of {pil.width}x{pil.height} pixels is over the limit of {settings.max_pixels}")
        pil.load()
        return pil.convert("RGB")
    except TooLarge:
        raise
    except Image.UnidentifiedImageError:
        raise BadRequest("not a readable image: the format is not one Pillow knows (JPEG, PNG, WebP, ...)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRequest(f"not a readable image: {e}") from None
