"""The versioned index on disk: a committed base, a write-ahead log of the writes over it, one writer lock,
compaction, and the `Searcher` that reads them.

An index directory:

    model/              the exported encoders (`jaxmr.export`), so serving needs no training run
    current -> v000003  the live base version, replaced atomically (a symlink swap) by a build or a compaction
    v000003/
        manifest.json   model fingerprint, training config, counts, ScaNN parameters, source, times, version
        images/         embeddings.npy (float16 | float32 [N, E]), ids.npy (int64 [N]), meta.parquet, scann/
        captions/       the same for captions, when the source has them (meta: id, image_id, text)
    v000003.log         the writes over v000003 (`jaxmr.index.wal`): each add and delete since, one checksummed
                        record each, fsynced before the write is acknowledged
    files/              image files the index owns (rendered, decoded from a dataset or uploaded), by id
    .build/             embedded chunks of an unfinished build: the next `build_index` resumes from them
    .lock               held by the writer (build, add, delete, a compaction's swap); readers never take it
    .compact.lock       held while a compaction runs (one at a time)

A write costs what it changes: an add appends its vectors, ids and metadata rows to the log, a delete its ids;
a reader replays the log over the base (`jaxmr.index.live`: added vectors go into the base's searcher in
memory, deletes are tombstones). Compaction folds the log into a new base with the same ANN settings while
searches and writes go on, then, under the writer lock, starts the new base's log with the writes that arrived
meanwhile and swaps `current`. Versions are immutable once renamed into place, so any number of readers can load
one while a writer prepares the next; the two previous versions (and their logs) are kept for readers still
loading them.
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
import time
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
from jaxmr.index.collection import BACKENDS, Collection, check_files
from jaxmr.index.live import LiveCollection
from jaxmr.index.wal import START, Entry, WriteAheadLog, write_log

INDEX_FORMAT = 1
KEEP_VERSIONS = 3
TARGETS = ("images", "captions")
# Compaction is due when the writes over the base (added rows + tombstones) reach this share of it, and at
# least COMPACT_MIN: replaying them costs start-up time (the searcher takes ~6,000 upserts/s at 1M x 256) and
# tombstones make every search fetch deeper.
COMPACT_SHARE = 0.1
COMPACT_MIN = 1000

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


@contextlib.contextmanager
def _compaction_lock(path: Path) -> Iterator[None]:
    """One compaction at a time across processes (INDEX_DIR/.compact.lock); a second one waits for the first."""
    with open(path / ".compact.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compaction_running(path: Path) -> bool:
    """Whether some process (this one included) holds the compaction lock."""
    lock = path / ".compact.lock"
    if not lock.exists():
        return False
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


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


def log_path(version: Path) -> Path:
    """The write-ahead log over a version directory (beside it: the version itself never changes)."""
    return version.with_name(f"{version.name}.log")


def _version_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if re.fullmatch(r"v\d{6}", p.name) and p.is_dir())


def _clean(path: Path) -> list[str]:
    """What killed writers left behind, removed by the next writer (which holds the lock, so nothing here is
    in progress): half-written version folders (.vNNNNNN.*) and logs (.vNNNNNN.log.*), versions and logs past
    `current` (a compaction killed before its swap), link files of a swap (.current.PID), and files/ that no
    version's live rows reference (an upload killed before its log record, a delete before its unlink).
    While a compaction runs, its version in the making is left alone. Returns what went."""
    removed = []
    compacting = _compaction_running(path)
    try:
        live = current_version(path)
    except InvalidIndexError:
        live = None
    for p in path.iterdir():
        if compacting:
            pass
        elif re.fullmatch(r"\.v\d{6}\..+", p.name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
        elif live is not None and re.fullmatch(r"v\d{6}(\.log)?", p.name) and p.name[:7] > live.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
        if re.fullmatch(r"\.current\.\d+", p.name) and p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    files = path / "files"
    if files.is_dir() and not (path / ".build").exists():  # an unfinished build's chunks own files of no version
        referenced = referenced_files(path)
        for f in files.iterdir() if referenced is not None else ():
            if f"files/{f.name}" not in referenced and f.is_file():
                f.unlink(missing_ok=True)
                removed.append(f"files/{f.name}")
    if removed:
        log.warning("%s: removed what an interrupted writer left: %s", path, ", ".join(sorted(removed)[:10]))
    return removed


def referenced_files(path: str | os.PathLike) -> set[str] | None:
    """The image paths of every version's live rows (its base's, less its log's deletes, plus its log's adds);
    None when a version or log cannot be read (then nothing can be called unreferenced)."""
    referenced: set[str] = set()
    for version in _version_dirs(Path(path)):
        try:
            table = pq.read_table(version / "images" / "meta.parquet", columns=["id", "path"])
            paths = dict(zip(table["id"].to_pylist(), table["path"].to_pylist(), strict=True))
            if log_path(version).exists():
                for entry in WriteAheadLog(log_path(version), int(version.name[1:]), create=False).entries():
                    if (write := _writes(entry, "images")) is None:
                        continue
                    if write[1] is not None:
                        paths.update((row["id"], row["path"]) for row in write[2])
                    else:
                        for i in write[0].tolist():
                            paths.pop(i, None)
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:  # cannot tell what is referenced
            log.warning("%s: not removing unreferenced files, %s is unreadable: %s", path, version.name, e)
            return None
        referenced.update(p for p in paths.values() if p)
    return referenced


def _stage(
    path: Path, manifest: dict, collections: dict[str, Collection | None], serve_meanwhile: bool = False
) -> Path:
    """Writes a version directory under a temporary name (.vNNNNNN.*); each collection's files (sizes,
    checksums) go into the manifest. `_publish` puts it in place. `serve_meanwhile`: see `Collection.save`."""
    name = f"v{int(manifest['version']):06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=path))
    try:
        for target, collection in collections.items():
            if collection is not None:
                files = collection.save(tmp / target, serve_meanwhile)
                manifest[target] = dict(manifest[target], files=files)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _publish(path: Path, tmp: Path, manifest: dict) -> Path:
    """Renames a staged version into place, then points `current` at it (rename of a symlink: atomic), and
    prunes versions (with their logs) older than the last KEEP_VERSIONS."""
    name = f"v{int(manifest['version']):06d}"
    final = path / name
    try:
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
        log_path(old).unlink(missing_ok=True)
    return final


def _commit(path: Path, manifest: dict, collections: dict[str, Collection | None]) -> Path:
    """Writes a new version directory and points `current` at it (`_stage`, then `_publish`)."""
    return _publish(path, _stage(path, manifest, collections), manifest)


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


def _load_collection(version: Path, manifest: dict[str, Any], target: str, backend: str | None = None) -> Collection:
    """A version's collection, its files checked against the manifest (sizes and checksums) before use; counts
    checked against the manifest after. `backend`: see `Collection.using`."""
    part = manifest[target]
    saved = AnnConfig.from_manifest(part["ann"])
    # for the mesh, no ScaNN searcher is loaded only to be replaced: the arrays alone (method exact)
    ann = dataclasses.replace(saved, method="exact") if backend == "mesh" and saved.method != "mesh" else saved
    collection = Collection.load(version / target, ann, part.get("files"))
    if len(collection) != part["count"]:
        raise InvalidIndexError(f"{version / target}: {len(collection)} vectors, the manifest says {part['count']}")
    collection.index_ann = saved
    return collection.using(backend)


@dataclasses.dataclass(frozen=True)
class _State:
    """One consistent view of the index: a base version, both targets as searches see them, and how far into
    the base's log they go."""

    version: Path
    manifest: dict[str, Any]  # the base version's, as on disk
    images: LiveCollection
    captions: LiveCollection | None
    log: WriteAheadLog | None  # the base's log, once it has one
    log_end: int  # bytes of the log applied
    seq: int  # the sequence number of the next write (the index's writes so far)
    next_image_id: int
    next_caption_id: int


def _base_state(version: Path, manifest: dict[str, Any], images: Collection, captions: Collection | None) -> _State:
    return _State(version, manifest, LiveCollection.over(images), LiveCollection.over(captions) if captions else None,
                  None, START, int(manifest.get("seq", 0)), int(manifest["next_image_id"]),
                  int(manifest.get("next_caption_id", 0)))  # fmt: skip


def _writes(entry: Entry, target: str) -> tuple[np.ndarray, np.ndarray | None, list[dict[str, Any]]] | None:
    """What one logged add or delete does to `target`: (ids, vectors or None for a delete, metadata rows), or None
    when it does not touch it."""
    ids = entry.arrays.get(f"{target[:-1]}_ids")
    if ids is None or len(ids) == 0:
        return None
    if entry.op == "add":
        return ids, entry.arrays[f"{target[:-1]}_vectors"], entry.meta[target]
    return ids, None, []


def _replay(state: _State, entries: list[Entry], end: int) -> _State:
    """`state` with logged writes applied: adds append to the delta, deletes become tombstones (after the adds of
    the same batch: an id is only ever deleted after it was added, and never reused)."""
    if not entries:
        return dataclasses.replace(state, log_end=end)
    where = state.log.path if state.log is not None else state.version
    added: dict[str, list] = {"images": [], "captions": []}
    deleted: dict[str, list] = {"images": [], "captions": []}
    for entry in entries:
        if entry.op not in ("add", "delete"):
            raise InvalidIndexError(f"{where}: record {entry.seq} is a {entry.op!r}, not an add or a delete")
        for target in TARGETS:
            if (write := _writes(entry, target)) is None:
                continue
            if entry.op == "add":
                added[target].append(write)
            else:
                deleted[target].append(write[0])
    collections = {"images": state.images, "captions": state.captions}
    for target in TARGETS:
        live = collections[target]
        if live is None:
            if added[target] or deleted[target]:
                raise InvalidIndexError(f"{where}: writes to captions in an index without captions")
            continue
        try:
            if added[target]:
                live = live.with_added(np.concatenate([a[0] for a in added[target]]),
                                       np.concatenate([a[1] for a in added[target]]),
                                       [row for a in added[target] for row in a[2]])  # fmt: skip
            if deleted[target]:
                live = live.with_deleted(np.concatenate(deleted[target]))
        except ValueError as e:  # ids out of order, vectors of another width: not a log of this base
            raise InvalidIndexError(f"{where}: the logged {target} do not fit the base: {e}") from None
        collections[target] = live
    next_ids = {t: max([int(a[0].max()) + 1 for a in added[t]], default=0) for t in TARGETS}
    return dataclasses.replace(
        state, images=collections["images"], captions=collections["captions"], log_end=end,
        seq=entries[-1].seq + 1, next_image_id=max(state.next_image_id, next_ids["images"]),
        next_caption_id=max(state.next_caption_id, next_ids["captions"]),
    )  # fmt: skip


class Searcher:
    """A loaded index: batched search over images and captions, add / delete that cost what they change, and
    compaction.

    Reads use a consistent snapshot (a search never sees half a change). Writes take the directory's writer
    lock, catch up with what other processes wrote (a new base, or records they appended to its log), append
    one fsynced log record and apply it; `refresh()` picks up other writers' changes.
    """

    def __init__(self, path: str | os.PathLike, encoder: Encoder | None = None, load_encoder: bool = True,
                 backend: str | None = None):  # fmt: skip
        self.path = Path(path)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend  # None: each target's own (its manifest's ann.method)
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
                images = _load_collection(version, manifest, "images", self.backend)
                captions = (_load_collection(version, manifest, "captions", self.backend)
                            if manifest.get("captions") else None)  # fmt: skip
                return self._read_log(_base_state(version, manifest, images, captions))
            except FileNotFoundError:
                continue
        raise InvalidIndexError(f"{self.path}: cannot read the current version (files missing)")

    def _read_log(self, state: _State) -> _State:
        """`state` with the records its base's log holds past `state.log_end` applied (the log opened the first
        time there is one)."""
        log = state.log
        if log is None:
            path = log_path(state.version)
            if not path.exists():
                return state
            log = WriteAheadLog(path, int(state.manifest["version"]), create=False)
            state = dataclasses.replace(state, log=log)
        elif log.path.stat().st_size <= state.log_end:
            return state
        entries, end = log.read(state.log_end)
        state = _replay(state, entries, end)
        return dataclasses.replace(state, seq=max(state.seq, log.next_seq))

    def _catch_up(self) -> _State:
        """The newest state, made this Searcher's (call with `_lock` held): a new base when `current` moved (a
        compaction elsewhere), else this base with what other writers appended to its log."""
        for _ in range(3):
            try:
                state = self._state
                state = self._load() if current_version(self.path) != state.version else self._read_log(state)
                break
            except FileNotFoundError:  # the log went with its version (pruned after a compaction): read again
                continue
        else:
            state = self._load()
        self._state = state
        return state

    # ---- reading

    @property
    def manifest(self) -> dict[str, Any]:
        """The base version's manifest (counts as of the base: `counts()` has the live ones)."""
        return self._state.manifest

    @property
    def version(self) -> int:
        """The base version (a build or a compaction makes a new one; adds and deletes do not)."""
        return int(self._state.manifest["version"])

    @property
    def generation(self) -> tuple[int, int]:
        """(base version, writes so far): changes with every add, delete and compaction."""
        state = self._state
        return int(state.manifest["version"]), state.seq

    def counts(self) -> dict[str, Any]:
        """Live counts per target (base, delta, tombstones, count), the log's size and the writes in it."""
        state = self._state
        return {
            "images": state.images.counts, "captions": state.captions.counts if state.captions else None,
            "log_bytes": state.log_end if state.log is not None else 0,
            "log_writes": state.seq - int(state.manifest.get("seq", 0)), "version": int(state.manifest["version"]),
        }  # fmt: skip

    def backends(self) -> dict[str, str | None]:
        """What searches each target: "scann", "mesh" or "exact" (None: no captions)."""
        state = self._state
        return {"images": state.images.base.backend,
                "captions": state.captions.base.backend if state.captions else None}  # fmt: skip

    def _meshes(self) -> list[Any]:
        state = self._state
        bases = [c.base for c in (state.images, state.captions) if c is not None]
        return [base.mesh for base in bases if base.mesh is not None]

    def warm_up(self, max_batch: int, max_k: int) -> None:
        """Compiles what searches of up to `max_batch` queries and `max_k` results will run (the mesh backend's
        programs; ScaNN compiles nothing)."""
        for mesh in self._meshes():
            mesh.warm_up(max_batch, max_k)

    def compiled_searches(self) -> int:
        """Search programs the mesh backend holds (0 for ScaNN)."""
        return sum(mesh.compiled_count() for mesh in self._meshes())

    def compaction_due(self, share: float = COMPACT_SHARE, minimum: int = COMPACT_MIN) -> bool:
        """Whether the writes over the base (added rows + tombstones, either target) reach `share` of it (and
        `minimum`)."""
        state = self._state
        for live in (state.images, state.captions):
            if live is not None:
                changed = live.n + len(live.deleted)
                if changed >= max(minimum, share * len(live.base)):
                    return True
        return False

    def collection(self, target: str = "images") -> LiveCollection:
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
        """Catches up with other writers (a new base, records appended to the log); True when anything changed."""
        with self._lock:
            before = self.generation
            self._catch_up()
            return self.generation != before

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
        index's files/ (bytes as given); paths are referenced where they are. Searchable, and durable, when
        this returns."""
        encoder = self._require_encoder()
        captions = [list(c) for c in captions] if captions is not None else [[] for _ in images]
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
        decoded = [load_image(image) for image in images]
        if not decoded:
            return []
        zimg = encoder.encode_images(np.stack([center_square(pil, encoder.image_size) for pil in decoded]))
        texts = [t for caps in captions for t in caps] if self._state.captions is not None else []
        ztxt = encoder.encode_texts(texts) if texts else None
        with self._lock, self._writing():
            state = self._catch_up()
            ids = np.arange(state.next_image_id, state.next_image_id + len(images), dtype=np.int64)
            rows: list[dict[str, Any]] = []
            try:
                for i, image, pil, caps in zip(ids, images, decoded, captions, strict=True):
                    rows.append(_image_row(int(i), image, pil, caps, self.path))
                meta: dict[str, Any] = {"images": rows}
                arrays = {"image_ids": ids, "image_vectors": zimg.astype(state.images.base.embeddings.dtype)}
                if ztxt is not None:
                    c0 = state.next_caption_id
                    cids = np.arange(c0, c0 + len(texts), dtype=np.int64)
                    owners = [int(i) for i, caps in zip(ids, captions, strict=True) for _ in caps]
                    meta["captions"] = [{"id": int(c), "image_id": i, "text": t}
                                        for c, i, t in zip(cids, owners, texts, strict=True)]  # fmt: skip
                    arrays.update(caption_ids=cids, caption_vectors=ztxt.astype(state.captions.base.embeddings.dtype))
                self._append(state, "add", meta, arrays)
            except BaseException:  # nothing logged: the files this call wrote go
                for row in rows:
                    if not Path(row["path"]).is_absolute():
                        (self.path / row["path"]).unlink(missing_ok=True)
                raise
        return [int(i) for i in ids]

    def add_vectors(self, vectors: np.ndarray, rows: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Adds precomputed image vectors float32 [N, E] (unit norm, from this index's model, as `write_index`
        takes them) with optional metadata rows (path, width, height, captions; default: no file); returns
        their ids. Captions given here are metadata only (not embedded)."""
        vectors = np.asarray(vectors, np.float32)
        dim = self.manifest["model"]["embed_dim"]
        if vectors.ndim != 2 or vectors.shape[1] != dim or not np.isfinite(vectors).all():
            raise ValueError(f"vectors must be finite [N, {dim}], got {vectors.shape}")
        rows = [dict(r) for r in rows] if rows is not None else [{} for _ in vectors]
        if len(rows) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(rows)} rows")
        fields = {"path", "width", "height", "captions"}
        for row in rows:
            if set(row) - fields:
                raise ValueError(f"unknown row fields {sorted(set(row) - fields)}; rows take {sorted(fields)}")
        if not len(vectors):
            return []
        with self._lock, self._writing():
            state = self._catch_up()
            ids = np.arange(state.next_image_id, state.next_image_id + len(vectors), dtype=np.int64)
            meta = {"images": [{"id": int(i), "path": r.get("path"), "width": int(r.get("width", 0)),
                                "height": int(r.get("height", 0)), "captions": [str(c) for c in r.get("captions", [])]}
                               for i, r in zip(ids, rows, strict=True)]}  # fmt: skip
            dtype = state.images.base.embeddings.dtype
            self._append(state, "add", meta, {"image_ids": ids, "image_vectors": vectors.astype(dtype)})
        return [int(i) for i in ids]

    def delete(self, ids: Sequence[int]) -> int:
        """Removes images (and their captions) by id; returns how many existed. Their owned files go too."""
        with self._lock, self._writing():
            state = self._catch_up()
            ids = np.unique(np.asarray(ids, np.int64).reshape(-1))
            present = ids[state.images.contains(ids)]
            if not len(present):
                return 0
            owned = [
                r["path"] for r in state.images.records(present) if r["path"] and not Path(r["path"]).is_absolute()
            ]
            arrays = {"image_ids": present}
            if state.captions is not None:
                arrays["caption_ids"] = state.captions.caption_ids_of(present)
            self._append(state, "delete", {}, arrays)
        for relative in owned:
            (self.path / relative).unlink(missing_ok=True)
        return len(present)

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

    def _append(self, state: _State, op: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Logs one write (durable when this returns) and makes the state with it this Searcher's (call with
        both locks held, `state` caught up)."""
        if state.log is None:  # the base's first write since it was committed
            log_ = WriteAheadLog(log_path(state.version), int(state.manifest["version"]), first_seq=state.seq)
            log_.read(state.log_end)
            state = dataclasses.replace(state, log=log_, log_end=log_.size)
        entry = state.log.append(op, meta, arrays)
        self._state = _replay(state, [entry], state.log.size)

    # ---- compaction

    def compact(self) -> dict[str, Any] | None:
        """Folds the log into a new base version with the same ANN settings (ScaNN rebuilt over the live vectors)
        and swaps it in; None when the log holds no writes. Searches and writes go on meanwhile: only the swap
        takes the writer lock, and writes that arrived during the build start the new base's log. One compaction
        runs at a time (a second waits). Returns what it did: versions, counts before, seconds."""
        with _compaction_lock(self.path):
            with self._lock, self._writing():
                state = self._catch_up()
            folded = state.seq - int(state.manifest.get("seq", 0))
            if folded == 0:
                return None
            if len(state.images) == 0:
                log.warning("%s: not compacting: every image is deleted (an index needs at least one)", self.path)
                return None
            start = time.perf_counter()
            images = state.images.compacted()
            captions = state.captions.compacted() if state.captions is not None and len(state.captions) else None
            number = int(state.manifest["version"]) + 1
            manifest = dict(state.manifest, version=number, updated=_now(), seq=state.seq,
                            next_image_id=state.next_image_id, next_caption_id=state.next_caption_id)  # fmt: skip
            manifest["images"] = dict(manifest["images"], count=len(images), ann=dataclasses.asdict(images.ann))
            if manifest.get("captions"):
                manifest["captions"] = (dict(manifest["captions"], count=len(captions), ann=dataclasses.asdict(
                    captions.ann)) if captions is not None else None)  # fmt: skip
            summary = {
                "from_version": int(state.manifest["version"]), "version": number, "folded_writes": folded,
                "images": state.images.counts, "captions": state.captions.counts if state.captions else None,
                "log_bytes": state.log_end,
            }  # fmt: skip
            manifest["compacted"] = dict(summary, at=_now(), build_seconds=round(time.perf_counter() - start, 3))
            tmp = _stage(self.path, manifest, {"images": images, "captions": captions}, serve_meanwhile=True)
            try:
                with self._lock, self._writing():
                    now = self._catch_up()
                    if now.version != state.version:
                        raise InvalidIndexError(f"{self.path}: the base changed during the compaction")
                    tail = now.log.read(state.log_end)[0] if now.log is not None else []
                    final = self.path / f"v{number:06d}"
                    write_log(log_path(final), number, tail, first_seq=state.seq)
                    final = _publish(self.path, tmp, manifest)
                    images, captions = images.using(self.backend), captions and captions.using(self.backend)
                    self._state = self._read_log(_base_state(final, manifest, images, captions))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # gone already once published
        summary.update(carried_writes=len(tail), seconds=round(time.perf_counter() - start, 3))
        log.info("%s: compacted %d writes into version %d in %.1f s (%d written meanwhile carried over)",
                 self.path, folded, number, summary["seconds"], len(tail))  # fmt: skip
        return summary


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
    """The manifest of an index's base, with its size on disk (base and log) and `live`: per target the base,
    delta, tombstone and live counts, and the log's size and writes; after the cheap checks of `verify_index`
    (the manifest, every file's size, the counts in the files' headers, the log's records): InvalidIndexError
    when one fails."""
    path = Path(path)
    version, manifest = _verify(path, full=False)
    live = _log_summary(version, manifest)
    manifest["live"] = live
    manifest["disk_bytes"] = sum(p.stat().st_size for p in version.rglob("*") if p.is_file()) + live["log_bytes"]
    return manifest


def _log_summary(version: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Counts from the base's manifest and its log's records (read, checksums checked; ScaNN not loaded)."""
    out: dict[str, Any] = {"log_bytes": 0, "torn_bytes": 0, "log_writes": 0}
    for target in TARGETS:
        part = manifest.get(target)
        out[target] = {"base": part["count"], "delta": 0, "tombstones": 0} if part else None
    path = log_path(version)
    if path.exists():
        log_ = WriteAheadLog(path, int(manifest["version"]), create=False)
        entries = log_.entries()
        out.update(log_bytes=log_.size, torn_bytes=log_.torn_bytes, log_writes=len(entries))
        for entry in entries:
            for target in TARGETS:
                if (write := _writes(entry, target)) is not None:
                    if out[target] is None:
                        raise InvalidIndexError(f"{path}: writes to captions in an index without captions")
                    out[target]["delta" if entry.op == "add" else "tombstones"] += len(write[0])
    for target in TARGETS:
        if out[target] is not None:
            c = out[target]
            c["count"] = c["base"] + c["delta"] - c["tombstones"]
    return out


@dataclasses.dataclass(frozen=True)
class LiveArrays:
    """A target's live rows without loading the index: the base's vectors memory-mapped (a reader takes only
    the rows it slices), the log's adds after them, and which rows a logged delete removed.

    `vectors` [N, E] slices like an array (rows base then delta), `ids` int64 [N], `valid` bool [N]."""

    version: Path
    manifest: dict[str, Any]
    vectors: Any
    ids: np.ndarray
    valid: np.ndarray

    @property
    def count(self) -> int:
        return int(self.valid.sum())


class _Rows:
    """Rows of a memory-mapped base followed by an in-memory delta, sliced as one [N, E] array."""

    def __init__(self, base: np.ndarray, delta: np.ndarray):
        self.base, self.delta = base, delta
        self.shape = (len(base) + len(delta), base.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        n = len(self.base)
        parts = [self.base[start : min(stop, n)], self.delta[max(start - n, 0) : max(stop - n, 0)]]
        return np.concatenate([np.asarray(p, np.float32) for p in parts])


def live_arrays(path: str | os.PathLike, target: str = "images") -> LiveArrays:
    """The current version's `target` as `LiveArrays` (files checked by size; the log's records by checksum)."""
    version, manifest = _current(Path(path))
    if target not in TARGETS or not manifest.get(target):
        raise InvalidIndexError(f"{path}: the index has no {target}")
    part, where = manifest[target], version / target
    check_files(where, part.get("files", {}), checksums=False)
    try:
        base = np.load(where / "embeddings.npy", mmap_mode="r")
        base_ids = np.load(where / "ids.npy")
    except (OSError, ValueError) as e:
        raise InvalidIndexError(f"{where}: cannot read the collection ({type(e).__name__}: {e})") from None
    dim = base.shape[1]
    added, deleted = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    vectors = [np.zeros((0, dim), np.float32)]
    if log_path(version).exists():
        for entry in WriteAheadLog(log_path(version), int(manifest["version"]), create=False).entries():
            if (write := _writes(entry, target)) is not None:
                if write[1] is None:
                    deleted.append(write[0])
                else:
                    added.append(write[0])
                    vectors.append(np.asarray(write[1], np.float32))
    ids = np.concatenate([base_ids.astype(np.int64), *added])
    valid = ~np.isin(ids, np.concatenate(deleted))
    return LiveArrays(version, manifest, _Rows(base, np.concatenate(vectors)), ids, valid)


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
    """Checks the current version of an index and its log, and returns the base's manifest with `live` counts
    (as `index_info`); InvalidIndexError names the first problem. Cheap checks (`full=False`, what `jaxmr index
    info` runs): the manifest's shape, every file's size against the manifest, the counts in the .npy and parquet
    headers against the manifest's count and against each other, the vector width, and the log's records. `full`
    adds every file's checksum, loading each collection (ScaNN included) with the log replayed over it, unique
    live ids, and that every image file the index's live rows own is there."""
    path = Path(path)
    version, manifest = _verify(path, full)
    manifest["live"] = _log_summary(version, manifest)
    return manifest


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
        return version, manifest
    searcher = Searcher(path, load_encoder=False)  # checks the checksums first, then replays the log
    if searcher._state.version != version:
        return _verify(path, full)  # compacted meanwhile: check the new base
    for target in TARGETS:
        if manifest.get(target) is None:
            continue
        live = searcher.collection(target)
        if len(np.unique(live.ids)) != len(live.ids):
            raise InvalidIndexError(f"{version / target}: ids are not unique")
        if target == "images":
            owned = [r for r in live.meta.column("path").to_pylist() if r and not Path(r).is_absolute()]
            missing = [r for r in owned if not (path / r).is_file()]
            if missing:
                raise InvalidIndexError(
                    f"{path}: {len(missing)} of the index's image files are missing ({missing[0]} ...)"
                )
    return version, manifest
