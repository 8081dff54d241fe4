"""A collection: one target's embeddings, ids, metadata and searcher (ScaNN on the host, or the mesh backend on
the devices JAX sees), in memory and on disk."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import signal
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxmr.index.ann import REORDER_LADDER, AnnConfig, InvalidIndexError, build_scann, exact_search
from jaxmr.index.mesh import MeshSearch

# A tree whose calibration needs more than this share of its leaves (or misses the target with all of them)
# is replaced by AH over every vector: searching nearly every leaf costs more than no tree.
TREE_USEFUL_SHARE = 0.5

CORES = os.cpu_count() or 1
BACKENDS = ("scann", "mesh")  # what a collection searches with (an index's own: its manifest's ann.method)
SERIALIZE_TIMEOUT = 600.0  # seconds a child process may take to write a searcher (1M x 256: 3.5 s)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- a collection


class Collection:
    """One modality's vectors: ids (int64 [N]), embeddings ([N, E]), metadata rows, and the searcher: `scann`
    (a ScaNN searcher), `mesh` (a `MeshSearch`, for ann.method "mesh") or neither (method "exact").

    A collection never changes once made: writes over it live in `jaxmr.index.live`. The searcher of an index
    saved before that may hold more vectors than the arrays (tombstones of deletes on a SOAR tree, whose ScaNN 1.4
    delete crashes the process), which searches skip; `tombstones` counts them. `ann` is how it searches,
    `index_ann` how its index was built (they differ when a server asks for another backend than the index's:
    compaction keeps the index's).
    """

    def __init__(self, ids: np.ndarray, embeddings: np.ndarray, meta: pa.Table, ann: AnnConfig, scann=None,
                 mesh: MeshSearch | None = None, index_ann: AnnConfig | None = None):  # fmt: skip
        if not (len(ids) == len(embeddings) == meta.num_rows):
            raise InvalidIndexError(
                f"ids ({len(ids)}), embeddings ({len(embeddings)}) and metadata ({meta.num_rows}) differ"
            )
        # one chunk: taking a row of a 1M-row table read in 8 chunks costs 1.2 ms, of one chunk 0.05 ms
        meta = meta.combine_chunks()
        self.ids, self.embeddings, self.meta, self.ann, self.scann = ids.astype(np.int64), embeddings, meta, ann, scann
        self.mesh, self._index_ann = mesh, index_ann
        self.calibration: dict[str, Any] | None = None
        self._sorted = np.argsort(self.ids, kind="stable")
        # ids first..first+N-1 in order (what a build makes): a row is the id minus the first, no bisection
        self._first = int(self.ids[0]) if len(self.ids) and _consecutive(self.ids) else None

    @classmethod
    def create(
        cls, ids: np.ndarray, embeddings: np.ndarray, meta: pa.Table, ann: AnnConfig, queries: np.ndarray | None = None
    ) -> Collection:
        """Builds the searcher. For a tree whose leaves_to_search is not given, the smallest number of leaves that
        reaches `ann.target_recall` on `queries` (float32 [Q, E]: the queries users will send, e.g. caption
        embeddings for an image index) is chosen; without queries, the collection's own vectors stand in and the
        choice is doubled, since cross-modal queries (the modality gap) need more leaves than same-modality ones.
        """
        resolved = ann.resolve(len(ids), embeddings.shape[1] if embeddings.ndim == 2 else 0)
        if resolved.method == "mesh":
            return cls(ids, embeddings, meta, resolved, mesh=_mesh_search(embeddings, ids, resolved))
        collection = cls(ids, embeddings, meta, resolved, build_scann(embeddings, ids, resolved))
        if resolved.method == "tree_ah" and ann.leaves_to_search == 0:
            probe = collection._sample(queries)  # one exact search, for the calibration and a fallback's recall
            collection._calibrate(*probe, reorder=ann.reorder == 0)
            chosen, leaves = collection.ann.leaves_to_search, collection.ann.num_leaves
            recall = collection.calibration["recall_at_10"]
            if chosen > TREE_USEFUL_SHARE * leaves or recall < ann.target_recall:
                # The tree searches (nearly) every leaf and so only adds work: AH over every vector instead.
                simpler = dataclasses.replace(ann, method="ah").resolve(len(ids), embeddings.shape[1])
                why = (f"a tree needed {chosen} of {leaves} leaves (recall@10 {recall:.3f}, target "
                       f"{ann.target_recall}): built {simpler.method} over every vector instead")  # fmt: skip
                log.info("%s", why)
                fallback = cls(ids, embeddings, meta, simpler, build_scann(embeddings, ids, simpler))
                measured = fallback._recall(probe[0], probe[1], None)
                fallback.calibration = {**collection.calibration, "recall_at_10": measured, "fallback": why}
                return fallback
        return collection

    def _sample(self, queries: np.ndarray | None, n_queries: int = 500) -> tuple[np.ndarray, np.ndarray, bool]:
        """Calibration queries float32 [Q, E] (given, else a sample of the collection's own vectors), the exact
        10th-best score of each (ties at the boundary count as found), and whether they are the own vectors."""
        rng = np.random.default_rng(0)
        own = queries is None or len(queries) == 0
        pool = self.embeddings if own else queries
        sample = np.asarray(pool[np.sort(rng.choice(len(pool), min(n_queries, len(pool)), replace=False))], np.float32)
        tenth = exact_search(self.embeddings, sample, 10)[1][:, -1]
        return sample, tenth, own

    def _recall(self, sample: np.ndarray, tenth: np.ndarray, leaves: int | None) -> float:
        """recall@10 against exact search, by score: a result counts when its exact score reaches the 10th best
        (so among many identical captions any ten of the tied ones are right answers)."""
        found = self._search_ann(sample, 10, leaves)[0]
        rows = self.rows_of(found.reshape(-1)).reshape(found.shape)
        vectors = np.asarray(self.embeddings, np.float32)[np.maximum(rows, 0)]
        exact = np.einsum("qe,qke->qk", sample, vectors)
        slack = 1e-5 + 1e-3 * (self.embeddings.dtype == np.float16)  # the stored vectors' rounding
        hits = (exact >= tenth[:, None] - slack) & (rows >= 0)
        return float(hits.sum(axis=1).mean() / min(10, len(self.ids)))

    def _calibrate(self, sample: np.ndarray, tenth: np.ndarray, own: bool, reorder: bool = False) -> None:
        """Sets leaves_to_search to the fewest leaves that reach the target on `sample` (see `_sample`), then
        with `reorder` (and given queries) the fewest re-scored candidates of REORDER_LADDER that still do."""
        leaves = self.ann.num_leaves
        ladder = sorted(
            {
                max(1, round(leaves * f))
                for f in (1 / 64, 1 / 32, 1 / 24, 1 / 16, 1 / 12, 1 / 8, 1 / 6, 1 / 5, 1 / 4, 1 / 3, 1 / 2, 1)
            }
        )
        chosen, recall = leaves, 1.0
        for n in ladder:
            recall = self._recall(sample, tenth, n)
            if recall >= self.ann.target_recall:
                chosen = n
                break
        if own:
            chosen = min(leaves, 2 * chosen)
        self.ann = dataclasses.replace(self.ann, leaves_to_search=chosen)
        if reorder and not own and recall >= self.ann.target_recall:
            wide = self.ann
            for candidates in (c for c in REORDER_LADDER if c < wide.reorder):
                self.ann = dataclasses.replace(wide, reorder=candidates)
                fewer = self._recall(sample, tenth, chosen)
                if fewer >= self.ann.target_recall:
                    recall = fewer
                    break
            else:
                self.ann = wide
        self.calibration = {"queries": "own vectors (doubled)" if own else "given", "recall_at_10": recall}
        log.info("calibrated leaves_to_search = %d of %d, reorder %d (recall@10 %.3f on %d queries)", chosen, leaves,
                 self.ann.reorder, recall, len(sample))  # fmt: skip

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def index_ann(self) -> AnnConfig:
        """The settings of the index this collection came from (`ann`, unless it searches with another backend)."""
        return self._index_ann or self.ann

    @index_ann.setter
    def index_ann(self, ann: AnnConfig) -> None:
        self._index_ann = ann

    @property
    def backend(self) -> str:
        """What searches: "mesh", "scann", or "exact" (numpy; an index built with method exact)."""
        return "mesh" if self.mesh is not None else "scann" if self.scann is not None else "exact"

    @property
    def searcher_size(self) -> int:
        """Vectors inside the searcher (the arrays' rows, plus its tombstones and what a live collection added)."""
        if self.mesh is not None:
            return len(self.mesh)
        return len(self.scann.docids) if self.scann is not None else len(self.ids)

    def using(self, backend: str | None) -> Collection:
        """This collection searched with `backend` ("mesh" or "scann"; None: its index's own), its searcher made
        from its vectors when it has another one (a ScaNN searcher with settings chosen for its size)."""
        if backend is None or backend == self.backend:
            return self
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "mesh":
            ann = self.index_ann if self.index_ann.method == "mesh" else AnnConfig(method="mesh")
            return Collection(self.ids, self.embeddings, self.meta, ann, mesh=_mesh_search(self.embeddings,
                              self.ids, ann), index_ann=self.index_ann)  # fmt: skip
        ann = AnnConfig(target_recall=self.index_ann.target_recall)
        made = Collection.create(self.ids, self.embeddings, self.meta, ann)
        made.index_ann = self.index_ann
        return made

    @functools.cached_property
    def tombstones(self) -> int:
        """Deleted vectors inside the searcher as it was made or loaded (searches fetch this many more and drop
        them); vectors a live collection upserts later are not counted."""
        return max(len(self.scann.docids) - len(self.ids), 0) if self.scann is not None else 0

    def rows_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row of each id; -1 where the id is not in the collection."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(self.ids) == 0:
            return np.full(len(ids), -1, np.int64)
        if self._first is not None:
            rows = ids - self._first
            return np.where((rows >= 0) & (rows < len(self.ids)), rows, -1)
        pos = np.searchsorted(self.ids, ids, sorter=self._sorted)
        pos = np.minimum(pos, len(self.ids) - 1)
        rows = self._sorted[pos]
        return np.where(self.ids[rows] == ids, rows, -1)

    def search(self, queries: np.ndarray, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [Q, E] -> (ids int64 [Q, k'], scores float32 [Q, k']), k' = min(k, N), best first."""
        queries = np.ascontiguousarray(queries, np.float32)
        if len(self.ids) == 0 or k < 1:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        if exact or self.backend == "exact":
            rows, scores = exact_search(self.embeddings, queries, k)
            return self.ids[rows], scores
        return self._search_ann(queries, min(k, len(self.ids)), self.ann.leaves_to_search or None)

    def ann_search(self, queries: np.ndarray, fetch: int, leaves: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
        """The searcher's answer as it is: (ids int64 [Q, <= fetch], scores float32), tombstones and all.
        `leaves` 0: the collection's own leaves_to_search (a ScaNN tree)."""
        if self.mesh is not None:
            return self.mesh.search(queries, fetch)
        pre = max(fetch, self.ann.reorder) if self.ann.method in ("ah", "tree_ah") else None
        leaves = (self.ann.leaves_to_search or None) if leaves == 0 else leaves
        # Spread over the cores: 1.6x the throughput of `search_batched` at 1,024 queries on 2 cores, the same
        # for one query.
        per_thread = min(256, max(1, -(-len(queries) // CORES)))
        ids, scores = self.scann.search_batched_parallel(
            queries, final_num_neighbors=fetch, pre_reorder_num_neighbors=pre, leaves_to_search=leaves,
            batch_size=per_thread,
        )  # fmt: skip
        ids = np.asarray(ids, np.int64).reshape(len(queries), -1)
        return ids, np.asarray(scores, np.float32).reshape(ids.shape)

    def _search_ann(self, queries: np.ndarray, k: int, leaves: int | None) -> tuple[np.ndarray, np.ndarray]:
        dead = self.tombstones
        ids, scores = self.ann_search(queries, k + dead, leaves)  # every tombstone could be among the best k
        if dead == 0 or ids.size == 0:
            return ids, scores
        live = (self.rows_of(ids) >= 0).reshape(ids.shape)
        ids, scores = live_first(ids, scores, live, k)
        width = min(k, int(live.sum(axis=1).min()))
        return ids[:, :width], scores[:, :width]

    def records(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        """Metadata of each id (None for an unknown id)."""
        rows = self.rows_of(ids)
        found = self.meta.take(pa.array(rows[rows >= 0])).to_pylist()
        it = iter(found)
        return [next(it) if r >= 0 else None for r in rows]

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        rows = self.rows_of(ids)
        if (rows < 0).any():
            raise KeyError(f"unknown id {int(np.asarray(ids)[rows < 0][0])}")
        return np.asarray(self.embeddings[rows], np.float32)

    def save(self, directory: Path, serve_meanwhile: bool = False) -> dict[str, dict[str, Any]]:
        """Writes the collection into `directory` (new); returns its files' sizes and checksums (`file_records`),
        which the version's manifest keeps so that a reader can refuse damaged files. `serve_meanwhile`: this
        process goes on answering searches in other threads, so the searcher is written by a child process
        (see `_serialize`)."""
        directory.mkdir(parents=True)
        np.save(directory / "embeddings.npy", self.embeddings)
        np.save(directory / "ids.npy", self.ids)
        pq.write_table(self.meta, directory / "meta.parquet")
        if self.scann is not None:
            (directory / "scann").mkdir()
            _serialize(self.scann, directory / "scann", in_child=serve_meanwhile)
            np.save(directory / "scann" / "docids.npy", np.asarray(self.scann.docids, np.int64))  # no pickle
        return file_records(directory)

    @classmethod
    def load(cls, directory: Path, ann: AnnConfig, files: dict[str, dict[str, Any]] | None = None) -> Collection:
        """Reads a saved collection, checking its files against `files` (the manifest's record) first. The
        arrays are read into memory, not memory-mapped: a file damaged after the check cannot crash a reader.
        A mesh collection's searcher is made from its vectors (placing them on the devices)."""
        if files is not None:
            check_files(directory, files)
        try:
            ids = np.load(directory / "ids.npy")
            embeddings = np.load(directory / "embeddings.npy")
            meta = pq.read_table(directory / "meta.parquet")
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError, pa.ArrowException) as e:  # a damaged file of an unchecked index
            raise InvalidIndexError(f"{directory}: cannot read the collection ({type(e).__name__}: {e})") from None
        if ids.ndim != 1 or embeddings.ndim != 2:
            shapes = f"ids {ids.shape} and embeddings {embeddings.shape}"
            raise InvalidIndexError(f"{directory}: {shapes} are not [N] and [N, E]")
        if ann.method == "mesh":
            return cls(ids, embeddings, meta, ann, mesh=_mesh_search(embeddings, ids, ann))
        scann = None
        if ann.method != "exact":
            import scann as scann_lib  # slow to import (~1 s); only loading a saved searcher needs it

            with contextlib.redirect_stdout(None):
                loaded = scann_lib.scann_ops_pybind.load_searcher(str(directory / "scann"))
            saved = directory / "scann" / "docids.npy"  # the searcher's order (older indexes: that of ids.npy)
            docids = np.load(saved) if saved.exists() else ids
            scann = scann_lib.scann_ops_pybind.ScannSearcher(loaded.searcher, docids=[int(i) for i in docids])
        return cls(ids, embeddings, meta, ann, scann)


def _mesh_search(embeddings: np.ndarray, ids: np.ndarray, ann: AnnConfig) -> MeshSearch:
    return MeshSearch(embeddings, ids, dtype=ann.device_dtype, recall_target=ann.approx or None)


def live_first(ids: np.ndarray, scores: np.ndarray, live: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of candidates already best first, the first k with the live ones moved to the front (in order)."""
    order = np.argsort(~live, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


def _serialize(scann, directory: Path, in_child: bool) -> None:
    """Writes a ScaNN searcher's files into `directory`. ScaNN's serializer holds Python's GIL throughout (3.5 s
    at 1M x 256 on this project's CPU, measured: every other thread of the process stops that long), so with
    `in_child` a forked child writes them: a copy-on-write image of this process that runs only ScaNN's C++
    serializer and exits, while this thread waits with the GIL released. A child that fails or outlasts
    SERIALIZE_TIMEOUT is killed and the files are written here instead."""
    if in_child and hasattr(os, "fork"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # JAX warns of a fork in a threaded process; the child runs no JAX
            pid = os.fork()
        if pid == 0:  # the child: ScaNN's writer, then out without any Python clean-up
            code = 1
            try:
                scann.searcher.serialize(str(directory), True)
                code = 0
            finally:
                os._exit(code)
        deadline, status = time.monotonic() + SERIALIZE_TIMEOUT, None
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = -signal.SIGKILL
            else:
                time.sleep(0.02)
        if status == 0:
            return
        log.warning("writing the searcher in a child process failed (%s): writing it here", status)
    scann.searcher.serialize(str(directory), True)


def _consecutive(ids: np.ndarray) -> bool:
    return bool(ids[-1] - ids[0] == len(ids) - 1 and (len(ids) < 2 or (np.diff(ids) == 1).all()))


# ---------------------------------------------------------------------------------------- file integrity


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Every file under `directory` (relative path -> {"bytes", "sha256"})."""
    return {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def check_files(directory: Path, files: dict[str, dict[str, Any]], checksums: bool = True) -> None:
    """Raises InvalidIndexError naming the first file of `files` that is missing, of another size or (with
    `checksums`) of other content; sizes are checked for every file before any checksum is computed."""
    if not isinstance(files, dict):
        raise InvalidIndexError(f"{directory}: the manifest's file list is not a mapping")
    for name, want in files.items():
        path = directory / name
        if not path.is_file():
            raise InvalidIndexError(f"{path} is missing")
        if path.stat().st_size != want.get("bytes"):
            raise InvalidIndexError(f"{path} has {path.stat().st_size} bytes, the manifest says {want.get('bytes')}")
    if checksums:
        for name, want in files.items():
            if _sha256(directory / name) != want.get("sha256"):
                raise InvalidIndexError(f"{directory / name} is damaged: its checksum differs from the manifest's")
