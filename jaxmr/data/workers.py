"""grain's worker processes, set up once for the training and the evaluation pipelines."""

from __future__ import annotations

import sys

import grain


def _flags_parsed() -> None:
    # grain reads absl flags in its workers; a library must not require the caller to parse them.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _quiet_grain_teardown(worker_index: int = 0, worker_count: int = 1) -> None:
    """grain's prefetch iterators close themselves in `__del__`, which fails harmlessly while the
    interpreter is tearing down (module globals already None) and prints a traceback per iterator.
    Silence exactly that case; every other unraisable exception is still printed."""

    default_hook = sys.unraisablehook
    if getattr(default_hook, "_jaxmr_quiet", False):
        return

    def hook(unraisable) -> None:
        teardown = isinstance(unraisable.exc_value, AttributeError) and "NoneType" in str(unraisable.exc_value)
        if not (teardown and "DatasetIterator.__del__" in repr(unraisable.object)):
            default_hook(unraisable)

    hook._jaxmr_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def in_workers(dataset: grain.IterDataset, num_workers: int, buffer_size: int = 2) -> grain.IterDataset:
    """Runs everything upstream of this point in `num_workers` processes (none: unchanged)."""
    if num_workers <= 0:
        return dataset
    _flags_parsed()
    _quiet_grain_teardown()
    options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer_size)
    return dataset.mp_prefetch(options, worker_init_fn=_quiet_grain_teardown)
