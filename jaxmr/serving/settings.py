"""Server settings: defaults, overridden by JAXMR_* environment variables, overridden by `jaxmr serve` flags."""

from __future__ import annotations

import dataclasses
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class Settings:
    index: str = ""  # index directory (`jaxmr index build --out`)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""  # when set, uploads and deletes need the header X-API-Key
    max_upload_bytes: int = 10 * 1024 * 1024  # per image, encoded
    max_pixels: int = 40_000_000  # per image, decoded (decompression bombs stop here)
    max_text_chars: int = 1000
    max_k: int = 100  # results per page
    max_offset: int = 1000  # how deep pagination goes
    max_batch: int = 64  # queries encoded and searched together
    batch_window_ms: float = 0.0  # extra wait for more queries; 0: batch whatever queued meanwhile
    compose_text_weight: float = 1.0  # image + text without a trained fusion module: zimg + w * ztxt
    # /api/projection: one t-SNE of this many sampled images per index version, computed on the first request
    # after a change (28 s for 500 on 2 cores), then sliced: no request can start a second one for a version
    projection_points: int = 600
    warm_up: bool = True
    # background compaction: once the index's logged adds + tombstones reach this share of its base (and
    # compact_min), the server folds them into a new base while it goes on serving; 0 turns it off
    # (`jaxmr index compact` does it on demand)
    compact_share: float = 0.1
    compact_min: int = 1000
    # what searches: "" the index's own (its manifest's ann.method), "mesh" the devices JAX sees (jaxmr.index.mesh),
    # "scann" ScaNN on the host (a searcher built at start for an index made for the mesh)
    backend: str = ""

    def __post_init__(self) -> None:
        positive = ("port", "max_upload_bytes", "max_pixels", "max_text_chars", "max_k", "max_batch",
                    "projection_points")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"setting {name} must be positive, got {getattr(self, name)}")
        if self.max_offset < 0 or self.batch_window_ms < 0 or self.compact_share < 0 or self.compact_min < 0:
            raise ValueError("max_offset, batch_window_ms, compact_share and compact_min cannot be negative")
        if self.backend not in ("", "mesh", "scann"):
            raise ValueError(f"setting backend must be mesh or scann (or empty: the index's own), got {self.backend!r}")
        if self.port > 65535:
            raise ValueError(f"setting port must be a TCP port (1-65535), got {self.port}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults < JAXMR_<NAME> environment variables < `overrides` (None values are ignored)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(f"JAXMR_{field.name.upper()}")
            if raw is None:
                continue
            kind = type(field.default)
            try:
                values[field.name] = parse_bool(raw) if kind is bool else kind(raw)
            except ValueError:
                what = "true or false (1/0, yes/no, on/off)" if kind is bool else f"a {kind.__name__}"
                raise ValueError(f"JAXMR_{field.name.upper()}={raw!r} is not {what}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def parse_bool(text: str) -> bool:
    """1/true/yes/on -> True, 0/false/no/off -> False (any case); anything else is a ValueError."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean")
