"""TFDS image-caption datasets through `tfds.data_source` (ArrayRecord, random access, no TensorFlow).

The converter that writes a caption folder as such a dataset is `jaxmr.data.convert`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxmr.data.records import DataError, Record, canonical_split

log = logging.getLogger(__name__)

# TFDS split names for jaxmr's canonical splits, tried in order.
_TFDS_SPLITS = {"train": ("train",), "val": ("validation", "val", "dev"), "test": ("test",)}


def tfds_module():
    import tensorflow_datasets as tfds  # imported lazily: it is slow to import and most runs never need it

    return tfds


def _texts(value: Any) -> list[str]:
    """Captions out of a decoded TFDS value: bytes, a string array, or a dict holding 'text'."""
    if isinstance(value, dict):
        return _texts(value.get("text", value.get("caption", [])))
    if isinstance(value, bytes | str):
        value = [value]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(value).reshape(-1)]


def _find_keys(features) -> tuple[str, str | None, str | None]:
    """(image key, captions key, id key) from a TFDS FeaturesDict."""
    tfds = tfds_module()
    image_key = caption_key = None
    for key, feature in features.items():
        if image_key is None and isinstance(feature, tfds.features.Image):
            image_key = key
        inner = feature.feature if isinstance(feature, tfds.features.Sequence) else feature
        is_text = isinstance(inner, tfds.features.Text) or (
            isinstance(inner, tfds.features.FeaturesDict) and ("text" in inner or "caption" in inner)
        )
        if caption_key is None and is_text and key != "id" and "file" not in key:
            caption_key = key
    if image_key is None:
        raise DataError(f"TFDS dataset has no Image feature (features: {', '.join(features)})")
    id_key = next((k for k in ("image/id", "id", "image/filename", "image_id") if k in features), None)
    return image_key, caption_key, id_key


class TfdsSource:
    """`tfds:NAME[:split]`: one split of a prepared TFDS dataset, read with `tfds.data_source`."""

    def __init__(self, name: str, split: str | None = "train", data_dir: str | None = None):
        self.split = canonical_split(split) or "train"
        self.name = f"tfds:{name}"
        self.dataset = name
        data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
        self._source, self._builder = _open(name, self.split, data_dir)
        features = self._builder.info.features
        self._image_key, self._caption_key, self._id_key = _find_keys(features)
        if len(self._source) == 0:
            raise DataError(f"split {self.split!r} of {self.name} is empty")
        # A classification set (imagenette, cifar10, imagenet2012, ...): its ClassLabel names the classes.
        tfds = tfds_module()
        self._label_key = next((k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)), None)
        self.classes = list(features[self._label_key].names) if self._label_key else []

    def labels(self, index: int) -> list[int]:
        if self._label_key is None:
            raise DataError(f"{self.name} has no class labels")
        return [int(np.asarray(self._source[int(index)][self._label_key]).item())]

    def __len__(self) -> int:
        return len(self._source)

    def captions(self, index: int) -> list[str]:
        return self[index]["captions"]

    def __getitem__(self, index: int) -> Record:
        example = self._source[int(index)]
        ident = example[self._id_key] if self._id_key else index
        ident = ident.decode() if isinstance(ident, bytes) else str(np.asarray(ident).item())
        captions = _texts(example[self._caption_key]) if self._caption_key else []
        return {
            "image": example[self._image_key],
            "captions": captions,
            "id": ident,
            "metadata": {"dataset": self.dataset, "index": int(index)},
        }


def _open(name: str, split: str, data_dir: str | None):
    tfds = tfds_module()
    errors = []
    for tfds_split in _TFDS_SPLITS[split]:
        try:
            return tfds.data_source(name, split=tfds_split, data_dir=data_dir), tfds.builder(name, data_dir=data_dir)
        except ModuleNotFoundError as e:  # a builder whose code needs TensorFlow: read its prepared files
            errors.append(str(e))
        except Exception as e:
            errors.append(f"split {tfds_split!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        prepared = _prepared_dir(name, data_dir)
        if prepared is not None:
            builder = tfds.builder_from_directory(prepared)
            if tfds_split in builder.info.splits:
                return builder.as_data_source(split=tfds_split), builder
    raise DataError(
        f"cannot open TFDS dataset {name!r} split {split!r} (data_dir={data_dir or '~/tensorflow_datasets'}): "
        + "; ".join(dict.fromkeys(errors))
        + ". Prepare it first (datasets whose builder code needs TensorFlow: `pip install tensorflow-cpu` "
        "and `tfds build NAME --file_format=array_record`), or set TFDS_DATA_DIR."
    )


def _prepared_dir(name: str, data_dir: str | None) -> Path | None:
    root = Path(data_dir or "~/tensorflow_datasets").expanduser() / name.replace(":", "/")
    if (root / "dataset_info.json").exists():
        return root
    versions = sorted((p for p in root.glob("*") if (p / "dataset_info.json").exists()), key=lambda p: p.name)
    return versions[-1] if versions else None
