"""The data layer: sources (shapes, caption folders, TFDS, image folders), source specs and the grain pipeline."""

from jaxmr.data.pipeline import (
    EvalStats,
    PipelineConfig,
    caption_table,
    eval_caption_batches,
    eval_image_batches,
    train_iterator,
)
from jaxmr.data.records import DataError, Record, Source
from jaxmr.data.spec import DEFAULT_SOURCE, SOURCES, parse_source

__all__ = [
    "DEFAULT_SOURCE",
    "SOURCES",
    "DataError",
    "EvalStats",
    "PipelineConfig",
    "Record",
    "Source",
    "caption_table",
    "eval_caption_batches",
    "eval_image_batches",
    "parse_source",
    "train_iterator",
]
