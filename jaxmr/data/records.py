"""The record every data source yields, and the errors the data layer raises."""

from __future__ import annotations

from typing import Any, Protocol, TypedDict

import numpy as np


class Record(TypedDict):
    """One image with its captions, as every source yields it.

    `image` is either decoded pixels (uint8 [H, W, 3]), the encoded file bytes, or a filesystem path (str);
    the pipeline's decode step turns all three into pixels, so sources stay cheap to index.
    """

    image: np.ndarray | bytes | str
    captions: list[str]
    id: str
    metadata: dict[str, Any]


class DataError(ValueError):
    """Bad input data: a malformed captions file, an empty split, an unknown source spec."""


class Source(Protocol):
    """A random-access source (grain's `RandomAccessDataSource` protocol plus a name and split)."""

    name: str
    split: str | None

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...

    def captions(self, index: int) -> list[str]:
        """The captions of record `index`, without loading its image."""
        ...


class LabelledSource(Source, Protocol):
    """A source whose images carry class labels (`labelled:DIR`, TFDS classification sets, the shapes world):
    `classes` names them, `labels(i)` gives record i's class indices (several for a multi-label image)."""

    classes: list[str]

    def labels(self, index: int) -> list[int]: ...


def has_labels(source: Source) -> bool:
    return bool(getattr(source, "classes", None)) and callable(getattr(source, "labels", None))


# Canonical split names; "val" and "dev" are the same split (Flickr8k says dev, COCO says val).
SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "dev": "val",
    "validation": "val",
    "test": "test",
    "all": None,
}


def canonical_split(split: str | None) -> str | None:
    """'dev' -> 'val', 'all' / None -> None (everything); an unknown name raises DataError."""
    if split is None:
        return None
    key = split.strip().lower()
    if key not in SPLIT_ALIASES:
        raise DataError(f"unknown split {split!r}; choose one of train, val (= dev), test, all")
    return SPLIT_ALIASES[key]


class ConcatSource:
    """Several sources read as one (e.g. every split of the shapes world for `--split all`)."""

    def __init__(self, parts: list[Source], name: str):
        self.parts, self.name, self.split = [p for p in parts if len(p)], name, None
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[Source, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.parts[part], int(index - self._starts[part])

    def __getitem__(self, index: int) -> Record:
        part, local = self._locate(int(index))
        return part[local]

    def captions(self, index: int) -> list[str]:
        part, local = self._locate(int(index))
        return part.captions(local)

    @property
    def classes(self) -> list[str] | None:
        """The parts' classes when they all have the same ones (see `LabelledSource`)."""
        names = [getattr(p, "classes", None) for p in self.parts]
        return names[0] if names and names[0] and all(n == names[0] for n in names) else None

    def labels(self, index: int) -> list[int]:
        part, local = self._locate(int(index))
        return part.labels(local)


def caption_table(source: Source) -> tuple[list[str], np.ndarray]:
    """Every caption of the source in order, and for each the index of its image: (texts, int32 [C])."""
    texts, owners = [], []
    for i in range(len(source)):
        captions = source.captions(i)
        texts.extend(captions)
        owners.extend([i] * len(captions))
    return texts, np.asarray(owners, np.int32)
