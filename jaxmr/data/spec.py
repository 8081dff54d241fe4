"""Source specs: the one string every data-taking command accepts.

shapes[:n=10000,size=64,seed=0,n_val=1000,n_test=1000]   the procedural default
captions:DIR[:allow_outside=1]                            images + a captions file (format auto-detected); image
                                                          names outside DIR only with allow_outside=1
coco:DIR                                                  COCO 2014/2017 layout
tfds:NAME[:split][:data_dir=DIR]                          any prepared TFDS image-caption dataset
images:DIR                                                a plain folder of images, no captions
labelled:DIR                                              an ImageFolder tree (class folders), no captions
wds:PATTERN                                               webdataset tar shards (img2dataset's output), e.g.
                                                          /data/cc3m/{00000..00331}.tar, /data/*.tar or a folder
parquet:PATTERN[:image=COL,caption=COL]                   parquet files with image bytes and captions
arrayrecord:DIR                                           what `jaxmr data convert` writes (ArrayRecord shards)
"""

from __future__ import annotations

from collections.abc import Callable

from jaxmr.data.arrayrecord import ArrayRecordSource
from jaxmr.data.captions import CaptionFolderSource, CocoSource, ImageFolderSource, LabelledFolderSource
from jaxmr.data.records import ConcatSource, DataError, Source, canonical_split
from jaxmr.data.shapes import ShapesConfig, ShapesSource
from jaxmr.data.shards import WebDatasetSource, parquet_source
from jaxmr.data.tfds_source import TfdsSource
from jaxmr.options import typed_options

DEFAULT_SOURCE = "shapes"


def _shapes(arg: str, split: str | None) -> Source:
    fields = {"n": int, "size": int, "seed": int, "n_val": int, "n_test": int}
    config = ShapesConfig(**typed_options(arg, fields, "shapes", DataError))
    if canonical_split(split) is None:  # "all": train, val and test one after another
        parts = [ShapesSource(config, s) for s in ("train", "val", "test") if config.count(s)]
        if not parts:
            raise DataError(f"shapes:{arg}: every split is empty (n, n_val and n_test are 0)")
        return ConcatSource(parts, parts[0].name)
    return ShapesSource(config, split)


def _tfds(arg: str, split: str | None) -> Source:
    name, *rest = arg.split(":")
    data_dir = None
    for part in rest:
        if part.startswith("data_dir="):
            data_dir = part.removeprefix("data_dir=")
        elif part:
            split = part  # a split in the spec wins over --split
    if not name:
        raise DataError("tfds: needs a dataset name, e.g. tfds:coco_captions:train")
    return TfdsSource(name, split, data_dir=data_dir)


def _captions(arg: str, split: str | None) -> Source:
    """captions:DIR[:allow_outside=1]"""
    root, _, options = arg.rpartition(":") if ":allow_outside=" in arg else (arg, "", "")
    allow = typed_options(options, {"allow_outside": int}, "captions", DataError).get("allow_outside", 0)
    if not root:
        raise DataError("captions: needs a directory, e.g. captions:/path/to/folder")
    return CaptionFolderSource(root, split, allow_outside=bool(allow))


def _needs_dir(kind: str, factory: Callable[..., Source]) -> Callable[[str, str | None], Source]:
    def make(arg: str, split: str | None) -> Source:
        if not arg:
            raise DataError(f"{kind}: needs a directory, e.g. {kind}:/path/to/folder")
        return factory(arg, split)

    return make


# An explicit registry: the spec's kind names a factory(arg, split) -> Source.
SOURCES: dict[str, Callable[[str, str | None], Source]] = {
    "shapes": _shapes,
    "captions": _captions,
    "coco": _needs_dir("coco", CocoSource),
    "tfds": _tfds,
    "images": _needs_dir("images", ImageFolderSource),
    "labelled": _needs_dir("labelled", LabelledFolderSource),
    "wds": WebDatasetSource,
    "parquet": parquet_source,
    "arrayrecord": _needs_dir("arrayrecord", ArrayRecordSource),
}


def parse_source(spec: str, split: str | None = "train") -> Source:
    """Opens the source a spec names, for one split ('train', 'val'/'dev', 'test', or 'all'/None)."""
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    if kind not in SOURCES:
        raise DataError(f"unknown data source {spec!r}; expected one of: {', '.join(s + ':...' for s in SOURCES)}")
    return SOURCES[kind](arg, split)
