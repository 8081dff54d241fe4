"""Any run as a model export: a dual-encoder run's checkpoint, or a composed run's base model plus its composer."""

from __future__ import annotations

import os

from jaxmr.training.composed import export_composed, is_composed_run
from jaxmr.training.runs import export_run


def export_model(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> str:
    """Writes a run's latest (or `step`) checkpoint as an export directory; returns the (base) fingerprint.

    In a multi-process run every process calls this (the checkpoint is restored collectively) and process 0
    writes; the others return ""."""
    if is_composed_run(workdir):
        return export_composed(workdir, out)
    return export_run(workdir, out, step)
