"""Composed-query data: (reference image, modification sentence, target image) triplets.

Two sources, one interface (`TripletSource`):

- `ShapesEdits` (spec `shapes-edits[:n=20000,size=48,seed=0,n_val=1000,n_test=1000]`): the shapes world with an
  edit applied — recolour, reshape, resize, move, add or remove one object ("make the circle blue", "move the
  square to the left", "add a small star"). Every reference scene gets EDITS_PER_REFERENCE different edits, so
  the targets of one reference are each other's hard negatives: an image-only query cannot tell them apart.
- `TripletFolder` (spec `triplets:DIR`): bring your own, CIRR / FashionIQ style. `DIR/<split>.tsv` (or .csv /
  .jsonl) has one triplet per row: `reference_image`, `text`, `target_image`, image paths relative to DIR.

A source numbers its *gallery* (every distinct image of the split, references and targets) and gives each
triplet as (reference gallery index, text, target gallery index); evaluation ranks the whole gallery, leaving
the query's own reference out, as CIRR does.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jaxmr.data.records import DataError, canonical_split
from jaxmr.data.shapes import (
    COLORS,
    RENDER_VERSION,
    SHAPES,
    SIZES,
    SPLIT_IDS,
    Obj,
    _clear,
    _random_scene,
    _rng,
    cache_dir,
    region,
    render,
)
from jaxmr.files import save_npy
from jaxmr.options import typed_options

EDITS_PER_REFERENCE = 2
EDIT_KINDS = ("color", "shape", "size", "move", "add", "remove")
TRIPLET_COLUMNS = ("reference_image", "text", "target_image")


class TripletSource(Protocol):
    name: str

    def __len__(self) -> int:
        """Number of triplets."""
        ...

    def triplet(self, index: int) -> tuple[int, str, int]:
        """(reference gallery index, modification text, target gallery index)."""
        ...

    def gallery_size(self) -> int: ...

    def gallery_image(self, index: int) -> Any:
        """A gallery image as `jaxmr.data.images.decode` takes it (uint8 array, bytes or a path)."""
        ...


# ------------------------------------------------------------------------------------------- shapes edits


def triplet_rows(source: TripletSource) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(references int64 [N], targets int64 [N], texts) of every triplet of a split: gallery rows and sentences."""
    triplets = [source.triplet(i) for i in range(len(source))]
    references = np.array([r for r, _, _ in triplets], np.int64)
    targets = np.array([t for _, _, t in triplets], np.int64)
    return references, targets, [text for _, text, _ in triplets]


def _name(o: Obj, scene: list[Obj]) -> str:
    """How an edit sentence names an object: by shape when that is unique in the scene, else colour + shape."""
    return f"the {o.shape}" if sum(p.shape == o.shape for p in scene) == 1 else f"the {o.color} {o.shape}"


def _free_spot(scene: list[Obj], rng: np.random.Generator, where: str | None = None) -> tuple[float, float] | None:
    """A centre clear of every object in `scene` (and inside `where`'s region: left/right/top/bottom)."""
    lo, hi = SIZES["large"] + 0.02, 1 - SIZES["large"] - 0.02
    for _ in range(200):
        x, y = (float(v) for v in rng.uniform(lo, hi, size=2))
        if where == "left":
            x = float(rng.uniform(lo, 0.3))
        elif where == "right":
            x = float(rng.uniform(0.7, hi))
        elif where == "top":
            y = float(rng.uniform(lo, 0.3))
        elif where == "bottom":
            y = float(rng.uniform(0.7, hi))
        if all(_clear((x, y), (o.x, o.y)) for o in scene):
            return x, y
    return None


def _unique(scene: list[Obj]) -> bool:
    return len({(o.color, o.shape) for o in scene}) == len(scene)


def edit(scene: list[Obj], kind: str, rng: np.random.Generator) -> tuple[list[Obj], str] | None:
    """Applies one edit of `kind` to a random object of `scene`: (edited scene, the sentence asking for it), or
    None when this scene admits no such edit (e.g. "add" to a full scene)."""
    i = int(rng.integers(len(scene)))
    o, rest = scene[i], scene[:i] + scene[i + 1 :]
    name = _name(o, scene)
    pick = lambda options: options[int(rng.integers(len(options)))]
    if kind == "color":
        color = pick([c for c in COLORS if c != o.color])
        new = [*rest[:i], dataclasses.replace(o, color=color), *rest[i:]]
        text = pick([f"make {name} {color}", f"change {name} to {color}", f"paint {name} {color}"])
    elif kind == "shape":
        shape = pick([s for s in SHAPES if s != o.shape])
        new = [*rest[:i], dataclasses.replace(o, shape=shape), *rest[i:]]
        text = pick([f"turn {name} into a {shape}", f"make {name} a {shape}", f"replace {name} with a {shape}"])
    elif kind == "size":
        size = "small" if o.size == "large" else "large"
        new = [*rest[:i], dataclasses.replace(o, size=size), *rest[i:]]
        text = pick([f"make {name} {size}", f"make {name} {'bigger' if size == 'large' else 'smaller'}"])
    elif kind == "move":
        where = pick(["left", "right", "top", "bottom"])
        if where in region(o):
            return None
        spot = _free_spot(rest, rng, where)
        if spot is None:
            return None
        new = [*rest[:i], dataclasses.replace(o, x=spot[0], y=spot[1]), *rest[i:]]
        text = pick([f"move {name} to the {where}", f"put {name} at the {where}"])
    elif kind == "add":
        if len(scene) >= 3:
            return None
        spot = _free_spot(scene, rng)
        if spot is None:
            return None
        added = Obj(pick(SHAPES), pick(list(COLORS)), pick(list(SIZES)), *spot)
        new = [*scene, added]
        text = pick([f"add a {added.size} {added.color} {added.shape}", f"add a {added.color} {added.shape}"])
    elif kind == "remove":
        if len(scene) < 2:
            return None
        new = rest
        text = pick([f"remove {name}", f"take away {name}", f"delete {name}"])
    else:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    return (new, text) if _unique(new) else None


@dataclasses.dataclass(frozen=True)
class EditsConfig:
    n: int = 20_000  # triplets in the train split (n / EDITS_PER_REFERENCE reference scenes)
    n_val: int = 1_000
    n_test: int = 1_000
    size: int = 48
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("n", "n_val", "n_test"):
            value = getattr(self, field)
            if value < 0 or value % EDITS_PER_REFERENCE:
                raise DataError(f"shapes-edits: {field} must be a non-negative multiple of {EDITS_PER_REFERENCE}, "
                                f"got {value}")  # fmt: skip
        if not 16 <= self.size <= 1024:
            raise DataError(f"shapes-edits: size must be between 16 and 1024 pixels, got {self.size}")

    def count(self, split: str) -> int:
        return {"train": self.n, "val": self.n_val, "test": self.n_test}[split]


class ShapesEdits:
    """One split of the shapes edit triplets. Gallery: the references (triplets / EDITS_PER_REFERENCE of them)
    first, then one target per triplet; images rendered once into a cache file, like `ShapesSource`."""

    def __init__(self, config: EditsConfig, split: str | None = "train"):
        self.config, self.split = config, canonical_split(split) or "train"
        self.name = f"shapes-edits:n={config.n},size={config.size},seed={config.seed}"
        if config.count(self.split) == 0:
            raise DataError(f"split {self.split!r} of {self.name} is empty")
        self._images: np.ndarray | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_images", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _images=None, _lock=threading.Lock())

    def __len__(self) -> int:
        return self.config.count(self.split)

    @property
    def n_references(self) -> int:
        return len(self) // EDITS_PER_REFERENCE

    def reference_scene(self, r: int) -> list[Obj]:
        return _random_scene(_rng(self.config.seed, SPLIT_IDS[self.split], 7, r))

    def edited(self, index: int) -> tuple[list[Obj], list[Obj], str, str]:
        """Triplet `index` as scenes: (reference, target, text, edit kind). The edits of one reference are of
        different kinds."""
        if not 0 <= index < len(self):
            raise IndexError(f"triplet {index} out of range for {len(self)}")
        r, slot = divmod(index, EDITS_PER_REFERENCE)
        reference = self.reference_scene(r)
        kinds = list(_rng(self.config.seed, SPLIT_IDS[self.split], 8, r).permutation(EDIT_KINDS))
        rng = _rng(self.config.seed, SPLIT_IDS[self.split], 9, r, slot)
        usable = []
        for kind in kinds:  # the order is shared by the reference's slots, so they pick different kinds
            result = edit(reference, kind, _rng(self.config.seed, SPLIT_IDS[self.split], 10, r, kind))
            if result is not None:
                usable.append((kind, result))
            if len(usable) > slot:
                break
        kind, (target, text) = usable[slot] if len(usable) > slot else usable[int(rng.integers(len(usable)))]
        return reference, target, text, kind

    def triplet(self, index: int) -> tuple[int, str, int]:
        _, _, text, _ = self.edited(index)
        return index // EDITS_PER_REFERENCE, text, self.n_references + index

    def gallery_size(self) -> int:
        return self.n_references + len(self)

    def _render(self, g: int) -> np.ndarray:
        scene = self.reference_scene(g) if g < self.n_references else self.edited(g - self.n_references)[1]
        return render(scene, self.config.size, background_seed=(self.config.seed, 1_000_000 + g))

    def gallery_image(self, index: int) -> np.ndarray:
        if not 0 <= index < self.gallery_size():
            raise IndexError(f"gallery image {index} out of range for {self.gallery_size()}")
        with self._lock:
            if self._images is None:
                c = self.config
                path = (cache_dir() / "shapes" /
                        f"edits-v{RENDER_VERSION}-seed{c.seed}-size{c.size}-{self.split}-n{len(self)}.npy")  # fmt: skip
                if not path.exists():  # concurrent writers produce the same bytes
                    save_npy(path, np.stack([self._render(g) for g in range(self.gallery_size())]))
                self._images = np.load(path, mmap_mode="r")
        return np.array(self._images[index])


# ------------------------------------------------------------------------------------------- a folder


def _read_rows(path: Path) -> list[dict[str, str]]:
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected an object with {', '.join(TRIPLET_COLUMNS)}")
            rows.append(row)
        return rows
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))


class TripletFolder:
    """Triplets listed in `DIR/<split>.tsv|.csv|.jsonl` (columns reference_image, text, target_image; paths
    relative to DIR). Rows naming a missing image, or with an empty text, fail loudly with the row number."""

    def __init__(self, root: str | os.PathLike, split: str | None = "train"):
        self.root = Path(root)
        self.split = canonical_split(split) or "train"
        self.name = f"triplets:{root}"
        if not self.root.is_dir():
            raise DataError(f"triplets: {self.root} is not a directory")
        names = {"val": ("val", "dev"), "train": ("train",), "test": ("test",)}[self.split]
        files = [self.root / f"{n}{ext}" for n in names for ext in (".tsv", ".csv", ".jsonl")]
        found = [f for f in files if f.exists()]
        if not found:
            raise DataError(f"triplets: no {self.split} file in {self.root} (looked for "
                            f"{', '.join(f.name for f in files)})")  # fmt: skip
        path = found[0]
        rows = _read_rows(path)
        if not rows:
            raise DataError(f"{path}: no triplets")
        missing = [c for c in TRIPLET_COLUMNS if c not in rows[0]]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(TRIPLET_COLUMNS)}")
        gallery: dict[str, int] = {}
        self._triplets: list[tuple[int, str, int]] = []
        for number, row in enumerate(rows, 2 if path.suffix != ".jsonl" else 1):
            text = str(row.get("text") or "").strip()
            if not text:
                raise DataError(f"{path}: row {number} has an empty text")
            keys = []
            for column in ("reference_image", "target_image"):
                relative = str(row.get(column) or "").strip()
                file = (self.root / relative).resolve()
                if not relative or not file.is_file() or not file.is_relative_to(self.root.resolve()):
                    raise DataError(f"{path}: row {number}: {column} {relative!r} is not an image file under "
                                    f"{self.root}")  # fmt: skip
                keys.append(gallery.setdefault(relative, len(gallery)))
            self._triplets.append((keys[0], text, keys[1]))
        self._gallery = list(gallery)

    def __len__(self) -> int:
        return len(self._triplets)

    def triplet(self, index: int) -> tuple[int, str, int]:
        return self._triplets[index]

    def gallery_size(self) -> int:
        return len(self._gallery)

    def gallery_image(self, index: int) -> Path:
        return self.root / self._gallery[index]


def parse_triplets(spec: str, split: str | None = "train") -> TripletSource:
    """`shapes-edits[:options]` or `triplets:DIR`, for one split."""

    kind, _, arg = spec.strip().partition(":")
    if kind == "shapes-edits":
        fields = {"n": int, "size": int, "seed": int, "n_val": int, "n_test": int}
        return ShapesEdits(EditsConfig(**typed_options(arg, fields, "shapes-edits", DataError)), split)
    if kind == "triplets":
        if not arg:
            raise DataError("triplets: needs a directory, e.g. triplets:/path/to/folder")
        return TripletFolder(arg, split)
    raise DataError(f"unknown triplet source {spec!r}; expected shapes-edits[:n=...] or triplets:DIR")
