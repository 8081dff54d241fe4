"""Caption folders: a folder of images plus a captions file, in the formats people actually have.

Formats, detected from the files present in the folder:
  - Flickr8k `Flickr8k.token.txt` (`name.jpg#k<TAB>caption`), with `Flickr_8k.{train,dev,test}Images.txt`
    split lists when present (Flickr30k's `results_20130124.token` is the same format);
  - Flickr30k `results.csv` (`image_name| comment_number| comment`);
  - Karpathy `dataset_*.json` (`images[].filename/filepath/split/sentences[].raw`);
  - COCO `captions_*.json` (`images[].id/file_name`, `annotations[].image_id/caption`), split from the name;
  - CSV / TSV with a header naming `image` and `caption` columns, and optionally `split`
    (e.g. `captions.tsv` as `image<TAB>split<TAB>caption`), or headerless `image,caption[,split]`.

A file whose rows carry no split is split deterministically by a hash of the image name (90/5/5) so that
`--split` means the same thing on every machine. Images are read lazily: a record holds the image path and
the pipeline decodes it (a missing or corrupt file is skipped and counted there, not here).
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import os
from pathlib import Path

from jaxmr.data.records import DataError, Record, canonical_split

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IMAGE_SUBDIRS = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k_images", "")

# (image name, caption, split or None, line number); split None means "decide by hash".
Row = tuple[str, str, str | None, int]


def hash_split(name: str) -> str:
    """Deterministic 90/5/5 train/val/test split by the image's file name."""
    bucket = int(hashlib.sha1(Path(name).name.encode()).hexdigest(), 16) % 100
    return "test" if bucket < 5 else "val" if bucket < 10 else "train"


def _split_name(value: str, path: Path, line: int) -> str:
    key = value.strip().lower()
    if key == "restval":  # Karpathy's extra validation images are used for training by convention
        return "train"
    try:
        split = canonical_split(key)
    except DataError:
        raise DataError(f"{path}:{line}: unknown split {value!r} (expected train, val/dev or test)") from None
    if split is None:
        raise DataError(f"{path}:{line}: split 'all' is not a split a row can belong to")
    return split


def _flickr_token(path: Path) -> list[Row]:
    splits: dict[str, str] = {}
    for split, stem in (("train", "trainImages"), ("val", "devImages"), ("test", "testImages")):
        for candidate in path.parent.glob(f"*{stem}.txt"):
            for name in candidate.read_text().split():
                splits[name] = split
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, sep, caption = line.rstrip("\n").partition("\t")
            name = key.rsplit("#", 1)[0]
            if not sep or "#" not in key or not caption.strip():
                raise DataError(f"{path}:{line_no}: expected 'image.jpg#N<TAB>caption', got {line.strip()!r}")
            rows.append((name, caption.strip(), splits.get(name), line_no))
    return rows


def _flickr30k_csv(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        header = f.readline()
        if "|" not in header:
            raise DataError(f"{path}:1: expected the header 'image_name| comment_number| comment'")
        for line_no, line in enumerate(f, 2):
            if not line.strip():
                continue
            parts = [p.strip() for p in line.rstrip("\n").split("|")]
            if len(parts) < 3 or not parts[0] or not parts[2]:
                raise DataError(f"{path}:{line_no}: expected 'image| number| caption', got {line.strip()!r}")
            rows.append((parts[0], "|".join(parts[2:]), None, line_no))
    return rows


def _load_json(path: Path) -> dict:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f"{path}:1: expected a JSON object with an 'images' list")
    return data


def _karpathy(path: Path) -> list[Row]:
    rows = []
    for k, image in enumerate(_load_json(path)["images"]):
        try:
            name = os.path.join(image.get("filepath", ""), image["filename"])
            split = _split_name(image["split"], path, 1)
            captions = [s["raw"].strip() for s in image["sentences"]]
        except (KeyError, TypeError) as e:
            raise DataError(f"{path}: images[{k}] lacks {e} (expected filename, split, sentences[].raw)") from None
        rows.extend((name, c, split, 1) for c in captions if c)
    return rows


def _coco(path: Path) -> list[Row]:
    data = _load_json(path)
    stem = path.stem.lower()
    split = "train" if "train" in stem else "val" if "val" in stem else "test" if "test" in stem else None
    try:
        files = {image["id"]: image["file_name"] for image in data["images"]}
        rows = [(files[a["image_id"]], a["caption"].strip(), split, 1) for a in data.get("annotations", [])]
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: COCO captions file lacks {e} (images[].id/file_name, annotations[])") from None
    return [r for r in rows if r[1]]


def _table(path: Path) -> list[Row]:
    with path.open(encoding="utf-8", newline="") as f:
        first_line = f.readline()
        f.seek(0)
        delimiter = "\t" if "\t" in first_line else ","
        lines = list(csv.reader(f, delimiter=delimiter))
    if not lines:
        raise DataError(f"{path}:1: the captions file is empty")
    header = [h.strip().lower() for h in lines[0]]
    if "image" in header and "caption" in header:
        columns = {name: header.index(name) for name in ("image", "caption", "split") if name in header}
        body, first = lines[1:], 2
    else:
        columns = {"image": 0, "caption": 1, **({"split": 2} if len(lines[0]) >= 3 else {})}
        body, first = lines, 1
    rows = []
    for line_no, row in enumerate(body, first):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(columns.values()):
            raise DataError(
                f"{path}:{line_no}: expected {len(columns)} columns "
                f"({', '.join(sorted(columns, key=columns.get))}), got {len(row)}: {delimiter.join(row)!r}"
            )
        name, caption = row[columns["image"]].strip(), row[columns["caption"]].strip()
        if not name or not caption:
            raise DataError(f"{path}:{line_no}: empty image name or caption")
        split = _split_name(row[columns["split"]], path, line_no) if "split" in columns else None
        rows.append((name, caption, split, line_no))
    return rows


PARSERS = {
    "flickr_token": _flickr_token,
    "flickr30k_csv": _flickr30k_csv,
    "karpathy": _karpathy,
    "coco": _coco,
    "table": _table,
}


def find_captions_file(root: Path) -> tuple[Path, str]:
    """The captions file in `root` (or `root/annotations`) and its format."""
    candidates: list[tuple[str, str]] = [
        ("Flickr8k.token.txt", "flickr_token"),
        ("results_20130124.token", "flickr_token"),
        ("results.csv", "flickr30k_csv"),
        ("dataset_*.json", "karpathy"),
        ("captions_*.json", "coco"),
        ("annotations/captions_*.json", "coco"),
        ("captions.tsv", "table"),
        ("captions.csv", "table"),
        ("captions.txt", "table"),
        ("*.tsv", "table"),
        ("*.csv", "table"),
    ]
    for pattern, fmt in candidates:
        matches = sorted(root.glob(pattern))
        if matches:
            return matches[0], fmt
    raise DataError(
        f"no captions file found in {root}: expected one of Flickr8k.token.txt, results.csv, dataset_*.json, "
        "captions_*.json, or a CSV/TSV with image and caption columns"
    )


def _image_dirs(root: Path) -> list[Path]:
    dirs = [root / sub for sub in IMAGE_SUBDIRS if (root / sub).is_dir()]
    # COCO keeps images in train2017/ val2017/ beside annotations/
    dirs += sorted(p for p in root.iterdir() if p.is_dir() and p.name[-4:].isdigit())
    return dirs


class CaptionFolderSource:
    """Random-access source over one split of a caption folder: one record per image, all its captions.

    Image names are paths relative to the folder (or its image subfolder). A name that points outside the folder
    (an absolute path, or one that climbs out with "..") is refused, since whatever is indexed is served to
    anyone who can search; `allow_outside=True` (`captions:DIR:allow_outside=1`) accepts them for a captions
    file you trust. Symlinks inside the folder are followed either way."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = "train",
        captions_file: str | None = None,
        allow_outside: bool = False,
    ):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"caption folder {self.root} does not exist or is not a directory")
        if captions_file:
            path = Path(captions_file)
            fmt = _format_of(path)
        else:
            path, fmt = find_captions_file(self.root)
        self.captions_file, self.format = path, fmt
        self.split = canonical_split(split)
        self.name = f"captions:{self.root}"
        grouped: dict[str, list[str]] = collections.OrderedDict()
        split_of: dict[str, str] = {}
        for name, caption, row_split, _ in PARSERS[fmt](path):
            grouped.setdefault(name, []).append(caption)
            split_of.setdefault(name, row_split or hash_split(name))
        if not grouped:
            raise DataError(f"{path}: no captions found")
        self.split_sizes = dict(collections.Counter(split_of.values()))
        names = [n for n in grouped if self.split is None or split_of[n] == self.split]
        if not names:
            available = ", ".join(f"{s} ({c} images)" for s, c in sorted(self.split_sizes.items()))
            raise DataError(f"split {split!r} of {self.name} is empty; available splits: {available}")
        dirs = _image_dirs(self.root)
        self._items = [(n, grouped[n], _resolve(n, dirs)) for n in names]
        if not allow_outside:
            inside = os.path.normpath(self.root.absolute())
            outside = [n for n, _, p in self._items if not os.path.normpath(p.absolute()).startswith(inside + os.sep)]
            if outside:
                raise DataError(
                    f"{path}: {len(outside)} image names point outside {self.root} (e.g. {outside[0]!r}); move the "
                    f"images into the folder, or give captions:{self.root}:allow_outside=1 to index them where they are"
                )

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Record:
        name, captions, path = self._items[index]
        return {"image": str(path), "captions": list(captions), "id": name, "metadata": {"path": str(path)}}

    def captions(self, index: int) -> list[str]:
        return list(self._items[index][1])


def _format_of(path: Path) -> str:
    name = path.name
    if name.endswith(".token") or name.endswith(".token.txt"):
        return "flickr_token"
    if name == "results.csv":
        return "flickr30k_csv"
    if name.startswith("dataset_") and name.endswith(".json"):
        return "karpathy"
    if name.startswith("captions_") and name.endswith(".json"):
        return "coco"
    return "table"


def _resolve(name: str, dirs: list[Path]) -> Path:
    """The first image directory that holds `name`; the first directory when none does (then the
    pipeline reports the missing file, naming it, instead of the whole folder failing here)."""
    for d in dirs:
        candidate = d / name
        if candidate.is_file():
            return candidate
    return dirs[0] / name if dirs else Path(name)


class CocoSource(CaptionFolderSource):
    """`coco:DIR`: DIR/annotations/captions_{train,val}20XX.json with images in DIR/{train,val}20XX/."""

    def __init__(self, root: str | os.PathLike, split: str | None = "train"):
        root = Path(root).expanduser()
        want = canonical_split(split) or "train"
        files = sorted(root.glob(f"annotations/captions_{want}*.json")) + sorted(root.glob(f"captions_{want}*.json"))
        if not files:
            raise DataError(f"coco:{root}: no annotations/captions_{want}*.json (COCO has train and val splits)")
        super().__init__(root, split=want, captions_file=str(files[0]))
        self.name = f"coco:{root}"


class ImageFolderSource:
    """`images:DIR`: every image file under DIR (recursively, sorted), with no captions."""

    def __init__(self, root: str | os.PathLike, split: str | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a directory")
        self.split = None
        self.name = f"images:{self.root}"
        self._paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self._paths:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {self.root}")

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> Record:
        path = self._paths[index]
        rel = str(path.relative_to(self.root))
        return {"image": str(path), "captions": [], "id": rel, "metadata": {"path": str(path)}}

    def captions(self, index: int) -> list[str]:
        return []


LABELLED_SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "dev"), "test": ("test",)}


class LabelledFolderSource:
    """`labelled:DIR`: an ImageFolder tree, DIR/<class>/<image> — or DIR/<split>/<class>/<image> when DIR has
    train / val (validation, dev) / test folders. The classes are the class folders' names (their union over the
    splits, sorted, so every split numbers them alike); underscores read as spaces in prompts."""

    def __init__(self, root: str | os.PathLike, split: str | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"labelled folder {self.root} does not exist or is not a directory")
        self.split = canonical_split(split)
        self.name = f"labelled:{self.root}"
        split_dirs = {s: next((self.root / d for d in dirs if (self.root / d).is_dir()), None)
                      for s, dirs in LABELLED_SPLIT_DIRS.items()}  # fmt: skip
        if any(split_dirs.values()):
            tops = [d for d in split_dirs.values() if d is not None]
            if self.split is None:
                chosen = tops
            elif split_dirs[self.split] is None:
                raise DataError(f"{self.root} has no {self.split} folder (it has {', '.join(d.name for d in tops)})")
            else:
                chosen = [split_dirs[self.split]]
        else:
            tops = chosen = [self.root]
        self.classes = sorted({d.name for top in tops for d in top.iterdir() if d.is_dir()})
        if not self.classes:
            raise DataError(f"{self.root}: no class folders (expected DIR/<class>/<image> or DIR/<split>/<class>/...)")
        index = {c: i for i, c in enumerate(self.classes)}
        self._items = sorted(
            (p, index[p.relative_to(top).parts[0]])
            for top in chosen
            for p in top.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and len(p.relative_to(top).parts) >= 2
        )
        if not self._items:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the class folders of {self.root}")

    def __len__(self) -> int:
        return len(self._items)

    def labels(self, index: int) -> list[int]:
        return [self._items[index][1]]

    def __getitem__(self, index: int) -> Record:
        path, label = self._items[index]
        return {"image": str(path), "captions": [], "id": str(path.relative_to(self.root)),
                "metadata": {"path": str(path), "label": self.classes[label]}}  # fmt: skip

    def captions(self, index: int) -> list[str]:
        return []
