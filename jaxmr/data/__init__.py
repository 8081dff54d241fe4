"""The data layer: sources (shapes, caption folders, COCO, TFDS, image and triplet folders) and source specs.

Light on purpose (the server imports it): the grain pipelines are `jaxmr.data.train_batches` and
`jaxmr.data.eval_batches`, images are decoded in `jaxmr.data.images`, converters live in `jaxmr.data.convert`."""

from jaxmr.data.records import DataError, Record, Source, caption_table
from jaxmr.data.spec import DEFAULT_SOURCE, SOURCES, parse_source

__all__ = ["DEFAULT_SOURCE", "SOURCES", "DataError", "Record", "Source", "caption_table", "parse_source"]
