"""The shapes world: a procedural, seeded image-caption dataset that is jaxmr's built-in default.

Each image holds 1-3 objects, each with a shape, a colour, a size and a position; each image has 5 captions
paraphrased from a small grammar, with spatial relations ("a small red circle left of a large blue square").

Hard negatives are built in: images come in pairs (2k, 2k+1), and for about half of the pairs with two or
more objects the odd image is a *twin* of the even one — the same objects with two positions swapped or two
colours swapped. Twins have captions with the same bag of words but a different meaning ("a red circle left
of a blue square" / "a blue square left of a red circle"), so a bag-of-words model cannot tell them apart.

Everything is a pure function of (seed, split, index): any image can be rendered on its own, in any worker,
in any order, which is what a random-access grain source needs.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import threading
import typing
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from jaxmr.data.records import DataError, Record, canonical_split
from jaxmr.files import cache_dir, save_npy, write_text

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (40, 175, 70),
    "blue": (55, 95, 235),
    "yellow": (240, 215, 40),
    "purple": (155, 70, 210),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
# Radius as a fraction of the image side.
SIZES = {"small": 0.085, "large": 0.15}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
TWIN_PROBABILITY = 0.5
# Two objects' centres differ by at least this much along the axis their relation names, and by less than
# that much minus RELATION_MARGIN along the other axis, so "left of" / "above" is never ambiguous.
RELATION_MARGIN = 0.12


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, in [0, 1], left to right
    y: float  # centre, in [0, 1], top to bottom

    def phrase(self, style: int) -> str:
        if style == 1:
            return f"a {self.size} {self.shape} in {self.color}"
        if style == 2:
            return f"one {self.size} {self.color} {self.shape}"
        return f"a {self.size} {self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    n: int = 10_000  # images in the train split
    n_val: int = 1_000  # images in the val split
    n_test: int = 1_000  # images in the test split
    size: int = 64  # image side in pixels
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("n", "n_val", "n_test"):
            if getattr(self, field) < 0:
                raise DataError(f"shapes: {field} must be >= 0, got {getattr(self, field)}")
        if not 16 <= self.size <= 1024:
            raise DataError(f"shapes: size must be between 16 and 1024 pixels, got {self.size}")

    def count(self, split: str) -> int:
        return {"train": self.n, "val": self.n_val, "test": self.n_test}[split]


def _rng(*key: int) -> np.random.Generator:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def relation(a: Obj, b: Obj) -> str:
    """Where `a` is relative to `b`: 'left of', 'right of', 'above' or 'below'."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _clear(a: tuple[float, float], b: tuple[float, float]) -> bool:
    dx, dy = abs(a[0] - b[0]), abs(a[1] - b[1])
    return abs(dx - dy) >= RELATION_MARGIN and max(dx, dy) >= 2 * SIZES["large"] + 0.03


def _random_scene(rng: np.random.Generator) -> list[Obj]:
    n_objects = int(rng.choice([1, 2, 3], p=[0.2, 0.45, 0.35]))
    kinds: list[tuple[str, str]] = []
    while len(kinds) < n_objects:  # (colour, shape) pairs are unique so captions name objects unambiguously
        kind = (str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)))
        if kind not in kinds:
            kinds.append(kind)
    lo, hi = SIZES["large"] + 0.02, 1 - SIZES["large"] - 0.02
    for _ in range(1000):
        points = [tuple(rng.uniform(lo, hi, size=2)) for _ in range(n_objects)]
        if all(_clear(points[i], points[j]) for i in range(n_objects) for j in range(i)):
            break
    else:  # pragma: no cover - 3 points always fit within a few tries
        raise RuntimeError("could not place objects")
    return [
        Obj(shape=s, color=c, size=str(rng.choice(list(SIZES))), x=float(p[0]), y=float(p[1]))
        for (c, s), p in zip(kinds, points, strict=True)
    ]


def _twin(scene: list[Obj], rng: np.random.Generator) -> tuple[list[Obj], str, tuple[int, int]] | None:
    """Same objects, different meaning: swap two objects' positions, or two objects' colours."""
    if len(scene) < 2:
        return None
    i, j = (int(v) for v in rng.choice(len(scene), size=2, replace=False))
    a, b = scene[i], scene[j]
    twin = list(scene)
    if rng.random() < 0.5 and a.color != b.color:
        twin[i] = dataclasses.replace(a, color=b.color)
        twin[j] = dataclasses.replace(b, color=a.color)
        if len({(o.color, o.shape) for o in twin}) == len(twin):
            return twin, "swap_colors", (i, j)
        twin = list(scene)
    twin[i] = dataclasses.replace(a, x=b.x, y=b.y)
    twin[j] = dataclasses.replace(b, x=a.x, y=a.y)
    return twin, "swap_positions", (i, j)


def region(o: Obj) -> str:
    vertical = "top" if o.y < 0.38 else "bottom" if o.y > 0.62 else ""
    horizontal = "left" if o.x < 0.38 else "right" if o.x > 0.62 else ""
    if vertical and horizontal:
        return f"in the {vertical} {horizontal} corner"
    if vertical or horizontal:
        return f"at the {vertical or horizontal}"
    return "in the middle"


_REL_WORDS = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "above"),
    "below": ("below", "under", "beneath"),
}


def _caption(scene: list[Obj], rng: np.random.Generator, swapped: tuple[int, int] | None = None) -> str:
    """One caption. `swapped`: the two objects whose positions a twin swapped; naming them in the other
    order keeps the relation word, so twin and original captions share their bag of words."""
    style = int(rng.integers(3))
    if len(scene) == 1:
        (o,) = scene
        templates = (
            f"{o.phrase(style)} {region(o)}",
            f"there is {o.phrase(style)} {region(o)}",
            f"{o.phrase(style)} on a dark background",
            f"a picture of {o.phrase(style)}",
        )
        return templates[int(rng.integers(len(templates)))]
    i, j = (int(v) for v in rng.choice(len(scene), size=2, replace=False))
    if swapped is not None and {i, j} == set(swapped):
        i, j = j, i
    a, b = scene[i], scene[j]
    rel = relation(a, b)
    words = _REL_WORDS[rel][int(rng.integers(3))]
    core = f"{a.phrase(style)} {words} {b.phrase(style)}"
    others = [o for k, o in enumerate(scene) if k not in (i, j)]
    if not others:
        templates = (
            core,
            f"there is {core}",
            f"an image with {core}",
            f"{a.phrase(style)} and {b.phrase(style)}, the {a.shape} {words} the {b.shape}",
        )
        return templates[int(rng.integers(len(templates)))]
    (c,) = others
    templates = (
        f"{core}, and {c.phrase(style)}",
        f"{c.phrase(style)} with {core}",
        f"three shapes: {core}, and {c.phrase(style)}",
    )
    return templates[int(rng.integers(len(templates)))]


RENDER_VERSION = 1  # bump when rendering changes, so that cached images are not reused


class ShapesSource:
    """Random-access source of one split of the shapes world.

    The split's images are rendered once (a few seconds for 10,000) into a .npy file under `cache_dir()` and
    read back memory-mapped, and its scenes and captions are drawn once into a JSON file beside it, so that
    training spends no CPU on drawing: a record is two lookups (0.4 us, against 0.4 ms to draw its scene and
    captions, which on 2 cores took a third of the CPU the train step needs). `cache=False` draws on every
    access.
    """

    def __init__(self, config: ShapesConfig, split: str | None = "train", cache: bool = True) -> None:
        split = canonical_split(split) or "train"
        self.config = config
        self.split = split
        self.cache = cache
        self.name = f"shapes:n={config.n},size={config.size},seed={config.seed}"
        if config.count(split) == 0:
            raise DataError(f"split {split!r} of {self.name} is empty (n_{split} = 0)")
        self._images: np.ndarray | None = None
        self._table: list[dict[str, Any]] | None = None

    def __getstate__(self) -> dict:  # never pickle the memory map or the table into grain workers
        return {**self.__dict__, "_images": None, "_table": None}

    def render(self, index: int) -> np.ndarray:
        """The image of record `index`, drawn now: uint8 [size, size, 3]."""
        objects = [Obj(**o) for o in self._record(index)["metadata"]["objects"]]
        return render(objects, self.config.size, background_seed=(self.config.seed, index))

    _lock = threading.RLock()  # grain's reader threads share one source: build the cache once

    def _cache_path(self, suffix: str) -> Path:
        c = self.config
        return cache_dir() / "shapes" / f"v{RENDER_VERSION}-seed{c.seed}-size{c.size}-{self.split}-n{len(self)}{suffix}"

    def images(self) -> np.ndarray:
        """All images of the split, uint8 [n, size, size, 3], memory-mapped from the cache (made on first use)."""
        with self._lock:
            if self._images is None:
                path = self._cache_path(".npy")
                if not path.exists():  # concurrent writers produce the same bytes
                    save_npy(path, np.stack([self.render(i) for i in range(len(self))]))
                self._images = np.load(path, mmap_mode="r")
            return self._images

    def table(self) -> list[dict[str, Any]]:
        """Every record's metadata (objects as dicts, twin info) and captions, from the cache (made on first use):
        the same values `scene` and `captions` draw."""
        with self._lock:
            if self._table is None:
                path = self._cache_path("-records.json")
                if not path.exists():  # the rendering's version and the split's identity are in the name
                    write_text(path, json.dumps([self._draw(i) for i in range(len(self))]))
                self._table = json.loads(path.read_text())
            return self._table

    def _draw(self, index: int) -> dict[str, Any]:
        scene, info = self.scene(index)
        meta = {"objects": [dataclasses.asdict(o) for o in scene], **info}
        return {"metadata": meta, "captions": self._captions(index, scene, info)}

    def _record(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        if self.cache:
            try:
                return self.table()[index]
            except OSError as e:  # a read-only or full cache: draw instead
                self._no_cache(e)
        return self._draw(index)

    def _no_cache(self, error: OSError) -> None:
        self.cache = False
        logging.getLogger(__name__).warning("shapes cache unavailable (%s); drawing on access", error)

    def __len__(self) -> int:
        return self.config.count(self.split)

    def scene(self, index: int) -> tuple[list[Obj], dict[str, Any]]:
        """The objects of image `index` and how it relates to its pair-mate, drawn now."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        key = (self.config.seed, SPLIT_IDS[self.split], index // 2)
        base = _random_scene(_rng(*key, 0))
        info: dict[str, Any] = {"twin_of": None, "twin_kind": None, "twin_swap": None}
        if index % 2 == 0:
            return base, info
        rng = _rng(*key, 1)
        twin = _twin(base, rng) if rng.random() < TWIN_PROBABILITY else None
        if twin is None:
            return _random_scene(_rng(*key, 2)), info
        scene, kind, swap = twin
        return scene, {"twin_of": index - 1, "twin_kind": kind, "twin_swap": list(swap)}

    # The shape names are the classes (`jaxmr.report`): an image is labelled with every shape it shows. Its class
    # prompts follow the captions' grammar, ensembled over every size and colour (the world's "photo styles").
    classes: typing.ClassVar[list[str]] = list(SHAPES)
    templates: typing.ClassVar[tuple[str, ...]] = tuple(f"a {s} {c} {{}}" for s in SIZES for c in COLORS)

    def labels(self, index: int) -> list[int]:
        return sorted({SHAPES.index(o["shape"]) for o in self._record(int(index))["metadata"]["objects"]})

    def captions(self, index: int) -> list[str]:
        return list(self._record(int(index))["captions"])

    def _captions(self, index: int, scene: list[Obj], info: dict[str, Any]) -> list[str]:
        # Twins draw their captions with their pair-mate's random stream: same templates, same word choices,
        # so the hard negatives really share a bag of words.
        rng = _rng(self.config.seed, SPLIT_IDS[self.split], index // 2, 3)
        swapped = tuple(info["twin_swap"]) if info["twin_kind"] == "swap_positions" else None
        return [_caption(scene, rng, swapped) for _ in range(5)]

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        record = self._record(index)
        image = None
        if self.cache:
            try:
                image = np.array(self.images()[index])
            except OSError as e:
                self._no_cache(e)
        if image is None:
            image = self.render(index)
        return {
            "image": image,
            "captions": list(record["captions"]),
            "id": f"shapes-{self.split}-{index:06d}",
            "metadata": copy.deepcopy(record["metadata"]),
        }


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        r *= 0.85
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = math.radians(-90 + 36 * k)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"no polygon for {shape!r}")


def render(scene: list[Obj], size: int, background_seed: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Draws a scene: uint8 [size, size, 3]. Drawn at 4x and downsampled, for anti-aliased edges."""
    scale = 4
    side = size * scale
    shade = int(_rng(*background_seed, 7).integers(25, 60))
    canvas = Image.new("RGB", (side, side), (shade, shade, shade))
    draw = ImageDraw.Draw(canvas)
    for o in scene:
        cx, cy, r = o.x * side, o.y * side, SIZES[o.size] * side
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[o.color])
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=COLORS[o.color])
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX))
