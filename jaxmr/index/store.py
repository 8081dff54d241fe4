"""The versioned index on disk: versions committed atomically, one writer lock, and the `Searcher` that reads them.

An index directory:

    model/              the exported encoders (`jaxmr.export`), so serving needs no training run
    current -> v000003  the live version, replaced atomically (a symlink swap) by every change
    v000003/
        manifest.json   model fingerprint, training config, counts, ScaNN parameters, source, times, version
        images/         embeddings.npy (float16 | float32 [N, E]), ids.npy (int64 [N]), meta.parquet, scann/
        captions/       the same for captions, when the source has them (meta: id, image_id, text)
    files/              image files the index owns (rendered, decoded from a dataset or uploaded), by id
    .build/             embedded chunks of an unfinished build: the next `build_index` resumes from them
    .lock               held by the writer (build, add, delete); readers never take it

Versions are immutable once renamed into place, so any number of readers can load one while a single writer
prepares the next; the two previous versions are kept for readers still loading them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jaxmr.data.images import center_square, load_image
from jaxmr.encoder import Encoder
from jaxmr.export import ModelMismatchError
from jaxmr.index.ann import AnnConfig, InvalidIndexError
from jaxmr.index.collection import Collection, check_files

INDEX_FORMAT = 1
KEEP_VERSIONS = 3
TARGETS = ("images", "captions")

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------- the index on disk


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def _writer_lock(path: Path, clean: bool = True) -> Iterator[None]:
    """One writer at a time across processes (an advisory lock on INDEX_DIR/.lock); with `clean`, first removes
    what killed writers left (`_clean`)."""
    if path.exists() and not path.is_dir():
        raise InvalidIndexError(f"{path} is a file, not an index directory")
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if clean:
                _clean(path)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def current_version(path: Path) -> Path | None:
    """The version directory `current` points at; None when there is no `current` link. A link that is not
    one of this index's version names (a loop, a path elsewhere) is refused: versions live side by side."""
    link = Path(path) / "current"
    if not link.is_symlink():
        if link.exists():
            raise InvalidIndexError(f"{link} is not a symlink to a version directory")
        return None
    target = os.readlink(link)
    if not re.fullmatch(r"v\d{6}", target):
        raise InvalidIndexError(f"{link} points at {target!r}, not at a version directory of the index (vNNNNNN)")
    return Path(path) / target


def _version_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if re.fullmatch(r"v\d{6}", p.name) and p.is_dir())


def _clean(path: Path) -> list[str]:
    """What killed writers left behind, removed by the next writer (which holds the lock, so nothing here is
    in progress): half-written version folders (.vNNNNNN.*), link files of a swap (.current.PID), and files/
    that no version on disk references (an upload killed before its commit). Returns what went."""
    removed = []
    for p in path.iterdir():
        if re.fullmatch(r"\.v\d{6}\..+", p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        elif re.fullmatch(r"\.current\.\d+", p.name) and p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    files = path / "files"
    if files.is_dir() and not (path / ".build").exists():  # an unfinished build's chunks own files of no version
        referenced: set[str] | None = set()
        for version in _version_dirs(path):
            try:
                referenced.update(
                    pq.read_table(version / "images" / "meta.parquet", columns=["path"])["path"].to_pylist()
                )
            except (OSError, pa.ArrowException, KeyError) as e:  # cannot tell what is referenced: delete nothing
                log.warning("%s: not removing unreferenced files, %s is unreadable: %s", path, version.name, e)
                referenced = None
                break
        for f in files.iterdir() if referenced is not None else ():
            if f"files/{f.name}" not in referenced and f.is_file():
                f.unlink(missing_ok=True)
                removed.append(f"files/{f.name}")
    if removed:
        log.warning("%s: removed what an interrupted writer left: %s", path, ", ".join(sorted(removed)[:10]))
    return removed


def _commit(path: Path, manifest: dict, collections: dict[str, Collection | None]) -> Path:
    """Writes a new version directory, then points `current` at it (rename of a symlink: atomic). Each
    collection's files (sizes, checksums) go into the manifest."""
    number = int(manifest["version"])
    name = f"v{number:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=path))
    try:
        for target, collection in collections.items():
            if collection is not None:
                manifest[target] = dict(manifest[target], files=collection.save(tmp / target))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        final = path / name
        if final.exists():  # left by a writer that died between rename and link swap
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    link = path / f".current.{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(name)
    os.replace(link, path / "current")
    versions = _version_dirs(path)
    for old in versions[:-KEEP_VERSIONS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The current version's manifest, checked for the keys a reader relies on (InvalidIndexError otherwise)."""
    return _current(Path(path))[1]


def _current(path: Path) -> tuple[Path, dict[str, Any]]:
    """The current version directory and its checked manifest, read through one look at the `current` link."""
    if not path.is_dir():
        raise InvalidIndexError(f"{path} is not an index (not a directory)")
    version = current_version(path)
    if version is None:
        hint = " (an unfinished build: run `jaxmr index build` again to resume)" if (path / ".build").exists() else ""
        raise InvalidIndexError(f"{path} is not an index{hint}")
    try:
        manifest = json.loads((version / "manifest.json").read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise InvalidIndexError(f"{version / 'manifest.json'} cannot be read: {e}") from None
    return version, check_manifest(manifest, version)


def check_manifest(manifest: Any, version: Path) -> dict[str, Any]:
    """`manifest` when it has the shape this format needs; InvalidIndexError naming what is wrong otherwise."""
    where = version / "manifest.json"
    if not isinstance(manifest, dict):
        raise InvalidIndexError(f"{where} holds a {type(manifest).__name__}, not a manifest (a JSON object)")
    if manifest.get("format") != INDEX_FORMAT:
        raise InvalidIndexError(f"{where}: index format {manifest.get('format')!r}, expected {INDEX_FORMAT}")
    needs = {"version": int, "images": dict, "model": dict, "next_image_id": int}
    for key, kind in needs.items():
        if not isinstance(manifest.get(key), kind):
            raise InvalidIndexError(f"{where}: {key!r} is missing or not a {kind.__name__}")
    for target in TARGETS:
        part = manifest.get(target)
        if part is None and target == "captions":
            continue
        if not (isinstance(part, dict) and isinstance(part.get("count"), int) and isinstance(part.get("ann"), dict)):
            raise InvalidIndexError(f"{where}: {target!r} needs a count and ann settings")
    if not isinstance(manifest["model"].get("embed_dim"), int):
        raise InvalidIndexError(f"{where}: model.embed_dim is missing")
    return manifest


def _load_collection(version: Path, manifest: dict[str, Any], target: str) -> Collection:
    """A version's collection, its files checked against the manifest (sizes and checksums) before use; counts
    checked against the manifest after."""
    part = manifest[target]
    collection = Collection.load(version / target, AnnConfig.from_manifest(part["ann"]), part.get("files"))
    if len(collection) != part["count"]:
        raise InvalidIndexError(f"{version / target}: {len(collection)} vectors, the manifest says {part['count']}")
    return collection


@dataclasses.dataclass
class _State:
    version: Path
    manifest: dict[str, Any]
    images: Collection
    captions: Collection | None


class Searcher:
    """A loaded index: batched search over images and captions, and add / delete without a rebuild.

    Reads use a consistent snapshot (a search never sees half a change). Changes take the directory's writer
    lock, start from the newest committed version (another process may have changed it), and commit a new
    version atomically; `refresh()` picks up other writers' versions.
    """

    def __init__(self, path: str | os.PathLike, encoder: Encoder | None = None, load_encoder: bool = True):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cleaned = False  # the first write of this Searcher removes what killed writers left
        self._state = self._load()
        model_dir = self.path / "model"
        if encoder is None and load_encoder:
            encoder = Encoder.load(model_dir)
        if encoder is not None and encoder.fingerprint != self.manifest["model"]["fingerprint"]:
            raise ModelMismatchError(
                f"the model (fingerprint {encoder.fingerprint}) is not the one that built the index {self.path} "
                f"(fingerprint {self.manifest['model']['fingerprint']}); rebuild the index with this model or "
                "serve it with its own model"
            )
        self.encoder = encoder

    def _load(self) -> _State:
        for _ in range(3):  # a version may be pruned between reading the link and opening it: read again
            try:
                version, manifest = _current(self.path)
                images = _load_collection(version, manifest, "images")
                captions = _load_collection(version, manifest, "captions") if manifest.get("captions") else None
                return _State(version, manifest, images, captions)
            except FileNotFoundError:
                continue
        raise InvalidIndexError(f"{self.path}: cannot read the current version (files missing)")

    # ---- reading

    @property
    def manifest(self) -> dict[str, Any]:
        return self._state.manifest

    @property
    def version(self) -> int:
        return int(self._state.manifest["version"])

    def collection(self, target: str = "images") -> Collection:
        state = self._state
        if target not in TARGETS:
            raise ValueError(f"target must be 'images' or 'captions', got {target!r}")
        if target == "captions" and state.captions is None:
            raise ValueError("this index has no captions (built with --no-captions or from uncaptioned images)")
        return state.images if target == "images" else state.captions

    def search(
        self, queries: np.ndarray, k: int = 10, target: str = "images", exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [Q, E] (unit norm) -> (ids int64 [Q, k'], scores float32 [Q, k']), best first."""
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.manifest["model"]["embed_dim"]:
            raise ValueError(f"queries must be [Q, {self.manifest['model']['embed_dim']}], got {queries.shape}")
        return self.collection(target).search(queries, k, exact)

    def search_text(self, texts: Sequence[str], k: int = 10, target: str = "images", exact: bool = False):
        """Text queries -> (ids, scores) as `search`."""
        return self.search(self._require_encoder().encode_texts(texts), k, target, exact)

    def records(self, ids: Sequence[int], target: str = "images") -> list[dict[str, Any] | None]:
        return self.collection(target).records(ids)

    def image_file(self, image_id: int) -> Path | None:
        """The image file of an id (inside the index for owned images), None for an unknown id."""
        (record,) = self.records([image_id])
        if record is None or not record["path"]:  # unknown id, or vectors without a file (`write_index`)
            return None
        path = Path(record["path"])
        return path if path.is_absolute() else self.path / path

    def refresh(self) -> bool:
        """Loads the newest committed version if another writer made one; True when it changed."""
        version = current_version(self.path)
        if version == self._state.version:
            return False
        with self._lock:
            self._state = self._load()
        return True

    def _require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise ValueError("this Searcher was opened without a model; text and image queries need one")
        return self.encoder

    # ---- writing

    def add(
        self, images: Sequence[np.ndarray | bytes | str], captions: Sequence[Sequence[str]] | None = None
    ) -> list[int]:
        """Embeds and adds images (pixels, encoded bytes or paths; with optional captions); returns their ids.

        Unreadable images raise `ImageReadError` before anything changes. Bytes and pixels are stored in the
        index's files/ (bytes as given); paths are referenced where they are."""
        encoder = self._require_encoder()
        captions = [list(c) for c in captions] if captions is not None else [[] for _ in images]
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
        decoded = [load_image(image) for image in images]
        pixels = np.stack([center_square(pil, encoder.image_size) for pil in decoded]) if decoded else None
        with self._lock, self._writing():
            state = self._load()
            first = int(state.manifest["next_image_id"])
            ids = np.arange(first, first + len(images), dtype=np.int64)
            rows: list[dict[str, Any]] = []
            try:
                self._add(state, ids, images, decoded, pixels, captions, rows)
            except BaseException:  # nothing committed: the files this call wrote go
                for row in rows:
                    if not Path(row["path"]).is_absolute():
                        (self.path / row["path"]).unlink(missing_ok=True)
                raise
        return [int(i) for i in ids]

    def clean(self) -> list[str]:
        """Removes what killed writers left (see `_clean`), under the writer lock: a server calls it when it opens
        the index, since it will write to it. Returns what went; [] (and a warning) on a read-only index."""
        try:
            with self._lock, _writer_lock(self.path, clean=False):
                self._cleaned = True
                return _clean(self.path)
        except OSError as e:
            log.warning("%s: cannot clean up (read-only?): %s", self.path, e)
            return []

    def _writing(self) -> contextlib.AbstractContextManager:
        clean, self._cleaned = not self._cleaned, True
        return _writer_lock(self.path, clean=clean)

    def _add(self, state: _State, ids: np.ndarray, images: Sequence, decoded: list, pixels: np.ndarray | None,
             captions: list[list[str]], rows: list[dict[str, Any]]) -> None:  # fmt: skip
        """Writes the images' files (each row appended to `rows` as its file is written), embeds, commits."""
        encoder = self._require_encoder()
        first = int(state.manifest["next_image_id"])
        for i, image, pil, caps in zip(ids, images, decoded, captions, strict=True):
            rows.append(_image_row(int(i), image, pil, caps, self.path))
        if not rows:
            return
        zimg = encoder.encode_images(pixels)
        manifest = dict(state.manifest, next_image_id=first + len(images), updated=_now())
        images_col = state.images.added(ids, zimg, pa.Table.from_pylist(rows, schema=state.images.meta.schema))
        captions_col = state.captions
        texts = [(int(i), t) for i, caps in zip(ids, captions, strict=True) for t in caps]
        if captions_col is not None and texts:
            c0 = int(state.manifest["next_caption_id"])
            cids = np.arange(c0, c0 + len(texts), dtype=np.int64)
            ztxt = encoder.encode_texts([t for _, t in texts])
            meta = pa.Table.from_pylist(
                [{"id": int(c), "image_id": i, "text": t} for c, (i, t) in zip(cids, texts, strict=True)],
                schema=captions_col.meta.schema,
            )
            captions_col = captions_col.added(cids, ztxt, meta)
            manifest["next_caption_id"] = c0 + len(texts)
        self._commit(state, manifest, images_col, captions_col)

    def delete(self, ids: Sequence[int]) -> int:
        """Removes images (and their captions) by id; returns how many existed. Their owned files go too."""
        with self._lock, self._writing():
            state = self._load()
            rows = state.images.rows_of(ids)
            present = [int(i) for i in np.unique(np.asarray(ids, np.int64)[rows >= 0])]
            if not present:
                return 0
            owned = [
                r["path"] for r in state.images.records(present) if r["path"] and not Path(r["path"]).is_absolute()
            ]
            images_col = state.images.removed(present)
            captions_col = state.captions
            if captions_col is not None:
                gone = np.isin(np.asarray(captions_col.meta["image_id"], np.int64), present)
                captions_col = captions_col.removed(captions_col.ids[gone])
            self._commit(state, dict(state.manifest, updated=_now()), images_col, captions_col)
        for relative in owned:
            (self.path / relative).unlink(missing_ok=True)
        return len(present)

    def _commit(self, state: _State, manifest: dict, images: Collection, captions: Collection | None) -> None:
        manifest["version"] = int(state.manifest["version"]) + 1
        manifest["images"] = dict(manifest["images"], count=len(images))
        if captions is not None:
            manifest["captions"] = dict(manifest["captions"], count=len(captions))
        version = _commit(self.path, manifest, {"images": images, "captions": captions})
        self._state = _State(version, manifest, images, captions)


def _image_row(image_id: int, image: Any, pil: Image.Image, captions: list[str], root: Path) -> dict[str, Any]:
    """The metadata row of an image, storing its bytes under files/ when it has no file of its own."""
    if isinstance(image, str | Path) and Path(image).is_file():
        path = str(Path(image).resolve())
    else:
        files = root / "files"
        files.mkdir(exist_ok=True)
        if isinstance(image, bytes):
            ext = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}.get(
                Image.open(io.BytesIO(image)).format
            )
            if ext is None:  # an unusual format: keep a PNG the browser can show
                name = f"files/{image_id:09d}.png"
                pil.save(root / name)
            else:
                name = f"files/{image_id:09d}{ext}"
                (root / name).write_bytes(image)
        else:
            name = f"files/{image_id:09d}.png"
            pil.save(root / name)
        path = name
    return {"id": image_id, "path": path, "width": pil.width, "height": pil.height, "captions": captions}


IMAGE_SCHEMA = pa.schema([
    ("id", pa.int64()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("captions", pa.list_(pa.string())),
])  # fmt: skip
CAPTION_SCHEMA = pa.schema([("id", pa.int64()), ("image_id", pa.int64()), ("text", pa.string())])


def index_info(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an index, with its directory's size on disk, after the cheap checks of `verify_index`
    (the manifest, every file's size, the counts in the files' headers): InvalidIndexError when one fails."""
    path = Path(path)
    version, manifest = _verify(path, full=False)
    manifest["disk_bytes"] = sum(p.stat().st_size for p in version.rglob("*") if p.is_file())
    return manifest


def _npy_shape(path: Path) -> tuple[int, ...]:
    try:
        with path.open("rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            expected = f.tell() + int(np.prod(shape)) * dtype.itemsize
    except (OSError, ValueError, EOFError) as e:
        raise InvalidIndexError(f"{path} is not a readable .npy file: {e}") from None
    if path.stat().st_size != expected:  # cut short (or grown) after it was written
        raise InvalidIndexError(f"{path} has {path.stat().st_size} bytes; its header {shape} needs {expected}")
    return tuple(shape)


def verify_index(path: str | os.PathLike, full: bool = True) -> dict[str, Any]:
    """Checks the current version of an index and returns its manifest; InvalidIndexError names the first
    problem. Cheap checks (`full=False`, what `jaxmr index info` runs): the manifest's shape, every file's size
    against the manifest, the counts in the .npy and parquet headers against the manifest's count and against
    each other, and the vector width. `full` adds every file's checksum, loading each collection (ScaNN
    included), unique ids, and that every image file the index owns is there."""
    return _verify(Path(path), full)[1]


def _verify(path: Path, full: bool) -> tuple[Path, dict[str, Any]]:
    version, manifest = _current(path)
    dim = manifest["model"]["embed_dim"]
    for target in TARGETS:
        part = manifest.get(target)
        if part is None:
            continue
        directory = version / target
        if "files" in part:
            check_files(directory, part["files"], checksums=False)
        for name in ("ids.npy", "embeddings.npy", "meta.parquet"):
            if not (directory / name).is_file():
                raise InvalidIndexError(f"{directory / name} is missing")
        ids, embeddings = _npy_shape(directory / "ids.npy"), _npy_shape(directory / "embeddings.npy")
        try:
            rows = pq.read_metadata(directory / "meta.parquet").num_rows
        except (OSError, pa.ArrowException) as e:
            raise InvalidIndexError(f"{directory / 'meta.parquet'} is not a readable parquet file: {e}") from None
        count = part["count"]
        if ids != (count,) or len(embeddings) != 2 or embeddings[0] != count or rows != count:
            raise InvalidIndexError(f"{directory}: ids {ids}, embeddings {embeddings} and {rows} metadata rows do not "
                                    f"match the manifest's count of {count}")  # fmt: skip
        if embeddings[1] != dim:
            raise InvalidIndexError(f"{directory}: vectors of width {embeddings[1]}, the model's is {dim}")
        if not full:
            continue
        collection = _load_collection(version, manifest, target)  # checks the checksums first
        if len(np.unique(collection.ids)) != len(collection.ids):
            raise InvalidIndexError(f"{directory}: ids are not unique")
        if target == "images":
            owned = [r for r in collection.meta.column("path").to_pylist() if r and not Path(r).is_absolute()]
            missing = [r for r in owned if not (path / r).is_file()]
            if missing:
                raise InvalidIndexError(
                    f"{path}: {len(missing)} of the index's image files are missing ({missing[0]} ...)"
                )
    return version, manifest
