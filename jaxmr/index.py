"""A persistent, searchable index of image (and caption) embeddings: ScaNN for speed, exact search for truth.

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

import concurrent.futures
import contextlib
import dataclasses
import datetime
import fcntl
import io
import json
import logging
import math
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
from tqdm import tqdm

import jaxmr
from jaxmr import distributed
from jaxmr.data import caption_table, parse_source
from jaxmr.data.pipeline import ImageReadError, center_square, load_image
from jaxmr.export import Encoder, ModelMismatchError, export_model, read_export_meta

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
KEEP_VERSIONS = 3
TARGETS = ("images", "captions")
# ScaNN's own advice (its README's "choosing parameters"): brute force for small sets, asymmetric hashing
# with exact re-scoring for mid-sized ones, and a partitioning tree in front of that above ~100k.
BRUTE_FORCE_BELOW = 20_000
TREE_FROM = 100_000
SOAR_FROM = 500_000  # auto: trees over this many vectors spill with SOAR (measured: slower at 100k, faster at 1M)
SOAR_LAMBDA = 1.5
MAX_TOMBSTONES = 1024  # SOAR trees: deleted vectors left in the searcher (and filtered out) before a rebuild


class InvalidIndexError(ValueError):
    """A missing, malformed or incompatible index directory."""


# ------------------------------------------------------------------------------------------- ScaNN config


@dataclasses.dataclass(frozen=True)
class AnnConfig:
    """How an index searches. `method` "auto" picks by collection size (see `resolve`); "exact" is a matmul."""

    method: str = "auto"  # auto | brute_force | ah | tree_ah | exact
    num_leaves: int = 0  # tree_ah: 0 -> about sqrt(N)
    leaves_to_search: int = 0  # tree_ah: 0 -> calibrated at build time to reach `target_recall`
    reorder: int = 256  # ah, tree_ah: candidates re-scored exactly (at least k)
    dims_per_block: int = 0  # ah: dimensions per 4-bit code; 0 -> 4 for a tree over >= 128-d vectors, else 2
    quantization_threshold: float = 0.2  # ah: anisotropic loss threshold for unit-norm data
    training_sample_size: int = 100_000  # tree_ah: vectors the partitioner trains on
    # tree_ah: SOAR spilling (each vector also in a second leaf with orthogonal error), e.g. 1.5: fewer leaves
    # for the same recall. 0: off; -1: auto (SOAR_LAMBDA from SOAR_FROM vectors). Deletes become tombstones
    # (see `Collection.removed`).
    soar_lambda: float = -1.0
    overretrieve_factor: float = 2.0  # tree_ah with SOAR: how far the second leaf may be from the best
    target_recall: float = 0.96  # tree_ah calibration: recall@10 vs exact on sample queries (0.95 + a margin)

    def __post_init__(self) -> None:
        methods = ("auto", "brute_force", "ah", "tree_ah", "exact")
        if self.method not in methods:
            raise ValueError(f"ann.method must be one of {', '.join(methods)}, got {self.method!r}")
        if min(self.num_leaves, self.leaves_to_search, self.dims_per_block) < 0 or self.reorder < 1:
            raise ValueError(f"ann parameters out of range: {self}")
        if self.soar_lambda < 0 and self.soar_lambda != -1:
            raise ValueError(f"ann.soar_lambda must be -1 (auto), 0 (off) or positive, got {self.soar_lambda}")
        if self.soar_lambda > 0 and self.overretrieve_factor < 1:
            raise ValueError(f"ann.overretrieve_factor must be at least 1, got {self.overretrieve_factor}")

    def resolve(self, n: int, d: int = 0) -> AnnConfig:
        """Concrete parameters for `n` vectors of `d` dimensions: method, leaves and leaves to search, code size.

        A tree over >= 128-d vectors scores with 4 dimensions per 4-bit code (at 32-d, 8 such codes are too
        coarse for the 256 re-scored candidates to recover recall 0.96): on 1M x 256 text->image search (with
        the modality gap) that halves the scoring cost against 2, and the 256 candidates re-scored exactly keep
        recall@10 at 0.96 with the same 333 of 1,000 leaves (one run: p50 0.78 vs 1.43 ms, batch-1024 3,609
        vs 2,054 q/s; bench/results/README.md). From SOAR_FROM vectors, SOAR spilling: at 1M x 256 it needs 125
        leaves instead of 333 for the same recall (p50 0.62 vs 0.97 ms); at 100k it was slower (0.10 vs 0.08 ms)."""
        method = self.method
        if method == "auto":
            method = "brute_force" if n < BRUTE_FORCE_BELOW else "ah" if n < TREE_FROM else "tree_ah"
        dims = self.dims_per_block or (4 if method == "tree_ah" and d >= 128 else 2)
        if method != "tree_ah":
            return dataclasses.replace(self, method=method, num_leaves=0, leaves_to_search=0, dims_per_block=dims,
                                       soar_lambda=0.0)  # fmt: skip
        leaves = self.num_leaves or max(round(math.sqrt(n)), 1)
        # A starting point only: `Collection.create` calibrates leaves_to_search on sample queries.
        search = self.leaves_to_search or min(leaves, max(leaves // 16, 16))
        soar = self.soar_lambda if self.soar_lambda >= 0 else SOAR_LAMBDA if n >= SOAR_FROM else 0.0
        return dataclasses.replace(self, method=method, num_leaves=leaves, leaves_to_search=min(search, leaves),
                                   dims_per_block=dims, soar_lambda=soar)  # fmt: skip

    @classmethod
    def from_manifest(cls, saved: dict[str, Any]) -> AnnConfig:
        """The config an index was built with (indexes from before SOAR was a setting were built without it)."""
        return cls(**{"soar_lambda": 0.0, **saved})

    @classmethod
    def from_spec(cls, items: Sequence[str]) -> AnnConfig:
        """From `key=value` strings, e.g. ["method=tree_ah", "leaves_to_search=64"]; unknown keys fail."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip().removeprefix("ann.")
            if not sep or key not in fields:
                raise ValueError(f"ann setting {item!r}: expected key=value with key in {', '.join(fields)}")
            kind = type(getattr(cls(), key))
            try:
                values[key] = kind(raw.strip())
            except ValueError:
                raise ValueError(f"ann setting {item!r}: {raw!r} is not a {kind.__name__}") from None
        return cls(**values)


def build_scann(embeddings: np.ndarray, ids: np.ndarray, config: AnnConfig):
    """A ScaNN searcher over float32 [N, E] unit vectors whose docids are `ids`; None for method "exact"."""
    if config.method == "exact":
        return None
    import scann

    data = np.ascontiguousarray(embeddings, np.float32)
    if len(data) == 0:  # ScaNN builds an empty searcher only as a brute-force "pure dynamic" one
        config = dataclasses.replace(config, method="brute_force")
    builder = scann.scann_ops_pybind.builder(data, 10, "dot_product")
    if config.method == "tree_ah":
        soar = {"soar_lambda": config.soar_lambda, "overretrieve_factor": config.overretrieve_factor}
        builder = builder.tree(
            num_leaves=config.num_leaves,
            num_leaves_to_search=config.leaves_to_search,
            training_sample_size=min(config.training_sample_size, len(data)),
            **(soar if config.soar_lambda > 0 else {}),
        )
    if config.method in ("ah", "tree_ah"):
        builder = builder.score_ah(
            config.dims_per_block, anisotropic_quantization_threshold=config.quantization_threshold
        ).reorder(config.reorder)
    else:
        builder = builder.score_brute_force()
    return builder.build(docids=[int(i) for i in ids])


def exact_search(
    database: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum inner product search. database [N, E], queries [Q, E] -> (rows int64 [Q, k'], scores
    float32 [Q, k']) with k' = min(k, N), best first; the database is scored in chunks of `chunk` rows."""
    queries = np.asarray(queries, np.float32)
    k = min(k, len(database))
    best_rows = np.zeros((len(queries), 0), np.int64)
    best_scores = np.zeros((len(queries), 0), np.float32)
    for start in range(0, len(database), chunk):
        scores = queries @ np.asarray(database[start : start + chunk], np.float32).T
        kk = min(k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        best_rows = np.concatenate([best_rows, top + start], axis=1)
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        if best_rows.shape[1] > k:
            keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
            best_rows = np.take_along_axis(best_rows, keep, axis=1)
            best_scores = np.take_along_axis(best_scores, keep, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_rows, order, axis=1), np.take_along_axis(best_scores, order, axis=1)


class JaxExactSearch:
    """Exact maximum inner product search as one jitted XLA program, with the database resident on the device.

    database [N, E] is kept in `dtype` (bfloat16 halves the bytes a query reads: on a GPU the search is
    memory-bound). A batch of Q queries is scored in chunks of about `max_scores` / Q rows (`lax.scan`, scores
    accumulated in float32) keeping a running top-k, so 1,024 queries against 1M rows never hold the whole
    [Q, N] score matrix while a single query reads the database in one pass. `__call__(queries [Q, E], k)` ->
    (rows int64 [Q, k'], scores float32 [Q, k']), k' = min(k, N), best first. Each (Q, k) compiles once.
    """

    def __init__(self, database: np.ndarray, dtype: str = "float32", max_scores: int = 1 << 25, device=None):
        import jax
        import jax.numpy as jnp

        self.n, self.dtype, self.max_scores = len(database), jnp.dtype(dtype), max_scores
        self.database = jax.device_put(jnp.asarray(np.asarray(database, np.float32), self.dtype), device)
        self.nbytes = self.database.nbytes
        self._search = jax.jit(self._search_impl, static_argnames="k")

    def _search_impl(self, database, queries, k: int):
        import jax
        import jax.numpy as jnp

        q = queries.astype(self.dtype)

        def top(rows_block, start):  # [Q, k] best of one block of rows, with global row numbers
            scores = jnp.einsum("qe,ne->qn", q, rows_block, preferred_element_type=jnp.float32)
            values, at = jax.lax.top_k(scores, min(k, rows_block.shape[0]))
            return values, (start + at).astype(jnp.int32)

        def merge(a, b):
            values, where = jax.lax.top_k(jnp.concatenate([a[0], b[0]], axis=1), k)
            return values, jnp.take_along_axis(jnp.concatenate([a[1], b[1]], axis=1), where, axis=1)

        chunk = min(self.n, max(k, self.max_scores // max(len(q), 1)))
        full = self.n // chunk
        blocks = database[: full * chunk].reshape(full, chunk, -1)
        best = top(blocks[0], 0)
        if full > 1:
            step = lambda best, args: (merge(best, top(*args)), None)
            starts = jnp.arange(1, full, dtype=jnp.int32) * chunk
            best, _ = jax.lax.scan(step, best, (blocks[1:], starts))
        if full * chunk < self.n:  # the rows left over after the whole chunks
            best = merge(best, top(database[full * chunk :], full * chunk))
        return best[1], best[0]

    def __call__(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.n)
        rows, scores = self._search(
            self.database, np.asarray(queries, np.float32).reshape(-1, self.database.shape[1]), k
        )
        return np.asarray(rows, np.int64), np.asarray(scores, np.float32)


# ------------------------------------------------------------------------------------------- a collection


class Collection:
    """One modality's vectors: ids (int64 [N]), embeddings ([N, E]), metadata rows, and the searcher.

    The searcher may hold more vectors than the arrays: on a SOAR tree a delete leaves a tombstone (ScaNN 1.4's
    delete crashes the process on such trees), which searches skip; `tombstones` counts them.
    """

    def __init__(self, ids: np.ndarray, embeddings: np.ndarray, meta: pa.Table, ann: AnnConfig, scann=None):
        if not (len(ids) == len(embeddings) == meta.num_rows):
            raise InvalidIndexError(
                f"ids ({len(ids)}), embeddings ({len(embeddings)}) and metadata ({meta.num_rows}) differ"
            )
        self.ids, self.embeddings, self.meta, self.ann, self.scann = ids.astype(np.int64), embeddings, meta, ann, scann
        self.calibration: dict[str, Any] | None = None
        self._sorted = np.argsort(self.ids, kind="stable")

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
        collection = cls(ids, embeddings, meta, resolved, build_scann(embeddings, ids, resolved))
        if resolved.method == "tree_ah" and ann.leaves_to_search == 0:
            collection._calibrate(queries)
        return collection

    def _calibrate(self, queries: np.ndarray | None, n_queries: int = 500) -> None:
        rng = np.random.default_rng(0)
        own = queries is None or len(queries) == 0
        pool = self.embeddings if own else queries
        sample = np.asarray(pool[np.sort(rng.choice(len(pool), min(n_queries, len(pool)), replace=False))], np.float32)
        truth = self.ids[exact_search(self.embeddings, sample, 10)[0]]
        leaves = self.ann.num_leaves
        ladder = sorted(
            {
                max(1, round(leaves * f))
                for f in (1 / 64, 1 / 32, 1 / 24, 1 / 16, 1 / 12, 1 / 8, 1 / 6, 1 / 5, 1 / 4, 1 / 3, 1 / 2, 1)
            }
        )
        chosen, recall = leaves, 1.0
        for n in ladder:
            found = self._search_ann(sample, 10, n)[0]
            recall = float(np.mean([np.isin(f, t).mean() for f, t in zip(found, truth, strict=True)]))
            if recall >= self.ann.target_recall:
                chosen = n
                break
        if own:
            chosen = min(leaves, 2 * chosen)
        self.ann = dataclasses.replace(self.ann, leaves_to_search=chosen)
        self.calibration = {"queries": "own vectors (doubled)" if own else "given", "recall_at_10": recall}
        log.info("calibrated leaves_to_search = %d of %d (recall@10 %.3f on %d queries)", chosen, leaves, recall,
                 len(sample))  # fmt: skip

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tombstones(self) -> int:
        """Deleted vectors still inside the searcher (searches fetch this many more and drop them)."""
        return max(len(self.scann.docids) - len(self.ids), 0) if self.scann is not None else 0

    def rows_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row of each id; -1 where the id is not in the collection."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(self.ids) == 0:
            return np.full(len(ids), -1, np.int64)
        pos = np.searchsorted(self.ids, ids, sorter=self._sorted)
        pos = np.minimum(pos, len(self.ids) - 1)
        rows = self._sorted[pos]
        return np.where(self.ids[rows] == ids, rows, -1)

    def search(self, queries: np.ndarray, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [Q, E] -> (ids int64 [Q, k'], scores float32 [Q, k']), k' = min(k, N), best first."""
        queries = np.ascontiguousarray(queries, np.float32)
        if len(self.ids) == 0 or k < 1:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        if exact or self.scann is None:
            rows, scores = exact_search(self.embeddings, queries, k)
            return self.ids[rows], scores
        return self._search_ann(queries, min(k, len(self.ids)), self.ann.leaves_to_search or None)

    def _search_ann(self, queries: np.ndarray, k: int, leaves: int | None) -> tuple[np.ndarray, np.ndarray]:
        dead = self.tombstones
        fetch = k + dead  # every tombstone could be among the best k
        pre = max(fetch, self.ann.reorder) if self.ann.method in ("ah", "tree_ah") else None
        # Spread over the cores: 1.6x the throughput of `search_batched` at 1,024 queries on 2 cores, the same
        # for one query.
        per_thread = min(256, max(1, -(-len(queries) // (os.cpu_count() or 1))))
        ids, scores = self.scann.search_batched_parallel(
            queries, final_num_neighbors=fetch, pre_reorder_num_neighbors=pre, leaves_to_search=leaves,
            batch_size=per_thread,
        )  # fmt: skip
        ids = np.asarray(ids, np.int64).reshape(len(queries), -1)
        scores = np.asarray(scores, np.float32).reshape(ids.shape)
        if dead == 0 or ids.size == 0:
            return ids, scores
        live = (self.rows_of(ids) >= 0).reshape(ids.shape)
        keep = np.argsort(~live, axis=1, kind="stable")  # live results first, each group best first
        width = min(k, int(live.sum(axis=1).min()))
        return np.take_along_axis(ids, keep, 1)[:, :width], np.take_along_axis(scores, keep, 1)[:, :width]

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

    def added(self, ids: np.ndarray, embeddings: np.ndarray, meta: pa.Table) -> Collection:
        """A new collection with these rows (new ids only) added (ScaNN upsert: no rebuild)."""
        if len(ids) == 0:
            return self
        embeddings = embeddings.astype(self.embeddings.dtype)
        scann = self.scann
        if scann is not None:
            scann.upsert([int(i) for i in ids], np.ascontiguousarray(embeddings, np.float32), batch_size=256)
        return Collection(
            np.concatenate([self.ids, ids]),
            np.concatenate([self.embeddings, embeddings]),
            pa.concat_tables([self.meta, meta.cast(self.meta.schema)]),
            self.ann,
            scann,
        )

    def removed(self, ids: Sequence[int]) -> Collection:
        """A new collection without these ids (unknown ids are ignored).

        ScaNN deletes in place, except on a SOAR tree, where its delete crashes the process (ScaNN 1.4): there
        the vectors stay in the searcher as tombstones until more than MAX_TOMBSTONES pile up, and then the
        searcher is rebuilt from the remaining vectors with the same settings (seconds per 100k vectors)."""
        rows = self.rows_of(ids)
        if not (rows >= 0).any():
            return self
        keep = np.ones(len(self.ids), bool)
        keep[rows[rows >= 0]] = False
        out = Collection(self.ids[keep], self.embeddings[keep], self.meta.filter(pa.array(keep)), self.ann, self.scann)
        if self.scann is None:
            return out
        if not (self.ann.method == "tree_ah" and self.ann.soar_lambda > 0):
            self.scann.delete([int(i) for i in self.ids[~keep]])
        elif out.tombstones > MAX_TOMBSTONES:
            log.info("rebuilding the searcher without %d deleted vectors", out.tombstones)
            out.scann = build_scann(out.embeddings, out.ids, self.ann)
        return out

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        np.save(directory / "embeddings.npy", self.embeddings)
        np.save(directory / "ids.npy", self.ids)
        pq.write_table(self.meta, directory / "meta.parquet")
        if self.scann is not None:
            (directory / "scann").mkdir()
            self.scann.serialize(str(directory / "scann"), relative_path=True)
            (directory / "scann" / "scann_docids.pkl").unlink(missing_ok=True)  # no pickle: saved as .npy
            np.save(directory / "scann" / "docids.npy", np.asarray(self.scann.docids, np.int64))

    @classmethod
    def load(cls, directory: Path, ann: AnnConfig) -> Collection:
        ids = np.load(directory / "ids.npy")
        embeddings = np.load(directory / "embeddings.npy", mmap_mode="r")
        meta = pq.read_table(directory / "meta.parquet")
        scann = None
        if ann.method != "exact":
            import scann as scann_lib

            with contextlib.redirect_stdout(None):
                loaded = scann_lib.scann_ops_pybind.load_searcher(str(directory / "scann"))
            saved = directory / "scann" / "docids.npy"  # the searcher's order (older indexes: that of ids.npy)
            docids = np.load(saved) if saved.exists() else ids
            scann = scann_lib.scann_ops_pybind.ScannSearcher(loaded.searcher, docids=[int(i) for i in docids])
        return cls(ids, np.asarray(embeddings), meta, ann, scann)


# -------------------------------------------------------------------------------------- the index on disk


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    """One writer at a time across processes (an advisory lock on INDEX_DIR/.lock)."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def current_version(path: Path) -> Path | None:
    link = path / "current"
    return path / os.readlink(link) if link.is_symlink() else None


def _commit(path: Path, manifest: dict, collections: dict[str, Collection | None]) -> Path:
    """Writes a new version directory, then points `current` at it (rename of a symlink: atomic)."""
    number = int(manifest["version"])
    name = f"v{number:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=path))
    try:
        for target, collection in collections.items():
            if collection is not None:
                collection.save(tmp / target)
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
    versions = sorted(p for p in path.iterdir() if re.fullmatch(r"v\d{6}", p.name))
    for old in versions[:-KEEP_VERSIONS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    version = current_version(path)
    if version is None:
        hint = " (an unfinished build: run `jaxmr index build` again to resume)" if (path / ".build").exists() else ""
        raise InvalidIndexError(f"{path} is not an index{hint}")
    return json.loads((version / "manifest.json").read_text())


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
            version = current_version(self.path)
            if version is None:
                read_manifest(self.path)  # raises the helpful error
            try:
                manifest = json.loads((version / "manifest.json").read_text())
                if manifest.get("format") != INDEX_FORMAT:
                    raise InvalidIndexError(
                        f"{self.path}: index format {manifest.get('format')!r}, expected {INDEX_FORMAT}"
                    )
                images = Collection.load(version / "images", AnnConfig.from_manifest(manifest["images"]["ann"]))
                captions = None
                if manifest.get("captions"):
                    captions = Collection.load(
                        version / "captions", AnnConfig.from_manifest(manifest["captions"]["ann"])
                    )
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
        with self._lock, _writer_lock(self.path):
            state = self._load()
            first = int(state.manifest["next_image_id"])
            ids = np.arange(first, first + len(images), dtype=np.int64)
            rows = []
            for i, image, pil, caps in zip(ids, images, decoded, captions, strict=True):
                rows.append(_image_row(int(i), image, pil, caps, self.path))
            if not rows:
                return []
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
        return [int(i) for i in ids]

    def delete(self, ids: Sequence[int]) -> int:
        """Removes images (and their captions) by id; returns how many existed. Their owned files go too."""
        with self._lock, _writer_lock(self.path):
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


# ------------------------------------------------------------------------------------------------- build


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    captions: bool = True  # also embed and index every caption (image -> text search)
    chunk: int = 4096  # images per resumable chunk
    batch_size: int = 256  # images per encoder call (split over the devices)
    dtype: str = "float16"  # embeddings on disk: float16 | float32
    read_threads: int = 8
    ann: AnnConfig = AnnConfig()

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.chunk < 1 or self.batch_size < 1:
            raise ValueError("chunk and batch_size must be positive")


def _read(source, index: int, size: int, root: Path) -> dict[str, Any]:
    """Record `index` -> pixels for the encoder and its metadata row (image stored in files/ if needed)."""
    record = source[index]
    try:
        pil = load_image(record["image"], min_side=size)
        if isinstance(record["image"], str):
            with Image.open(record["image"]) as original:  # the real size, not the draft-decoded one
                width, height = original.size
        else:
            width, height = pil.size
    except ImageReadError as e:
        log.warning("index build: %s", e)
        return {"valid": False, "pixels": np.zeros((size, size, 3), np.uint8), "row": None}
    row = _image_row(index, record["image"], pil, list(record["captions"]), root)
    row.update(width=width, height=height)
    return {"valid": True, "pixels": center_square(pil, size), "row": row}


def _save_atomic(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def build_index(
    model: str | os.PathLike,
    source_spec: str,
    out: str | os.PathLike,
    split: str | None = None,
    options: BuildOptions = BuildOptions(),
    progress: bool = True,
) -> Searcher | None:
    """Embeds every image (and caption) of a source with a trained model and writes a searchable index.

    `model` is a training run directory or a model export. Work is saved in chunks under OUT/.build, so an
    interrupted build continues where it stopped when called again with the same arguments.

    In a multi-process run (`jax.distributed`, OUT on a filesystem they share) process p embeds the chunks
    c with c % processes == p on its own devices, and process 0 merges them into the index and returns its
    Searcher; the others return None once it is written."""
    out = Path(out)
    primary = distributed.is_primary()
    if current_version(out) is not None:
        raise InvalidIndexError(f"{out} already holds an index; choose a new --out, or delete it to rebuild")
    with _writer_lock(out) if primary else contextlib.nullcontext():
        model_dir = out / "model"
        work = out / ".build"
        source = parse_source(source_spec, split)
        index, count = distributed.share()
        if count > 1 and not model_dir.exists() and not (Path(model) / "params.npz").exists():
            export_model(model, model_dir)  # a run's checkpoint: restored by all processes together
        if primary:
            _plan_build(Path(model), model_dir, work, source, source_spec, options)
        distributed.barrier("index: planned")
        encoder = Encoder.load(model_dir)
        share = (index, count)
        _embed_images(source, encoder, out, work, options, progress and primary, share)
        texts, owners = caption_table(source) if options.captions else ([], np.zeros(0, np.int32))
        _embed_captions(texts, encoder, work, options, progress and primary, share)
        distributed.barrier("index: embedded")
        if not primary:
            distributed.barrier("index: written")
            return None
        meta = read_export_meta(model_dir)

        chunks = [np.load(p) for p in sorted(work.glob("images-*.npz"))]
        valid = np.concatenate([c["valid"] for c in chunks])
        zimg = np.concatenate([c["embeddings"] for c in chunks])[valid]
        rows = [json.loads(r) for c in chunks for r in c["rows"]]
        rows = [r for r, ok in zip(rows, valid, strict=True) if ok]
        ids = np.flatnonzero(valid).astype(np.int64)
        dtype = np.dtype(options.dtype)
        captions, ztxt = None, np.zeros((0, encoder.embed_dim), np.float32)
        if texts:
            keep = valid[owners]
            ztxt = np.concatenate([np.load(p) for p in sorted(work.glob("captions-*.npy"))])[keep]
            cids = np.flatnonzero(keep).astype(np.int64)
            kept_texts = [t for t, k in zip(texts, keep, strict=True) if k]
            table = pa.table(
                {"id": cids, "image_id": owners[keep].astype(np.int64), "text": kept_texts}, schema=CAPTION_SCHEMA
            )
            # each side is tuned on the other side's vectors: the queries it will mostly answer
            captions = Collection.create(cids, ztxt.astype(dtype), table, options.ann, queries=zimg)
        image_table = pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)
        images = Collection.create(ids, zimg.astype(dtype), image_table, options.ann, queries=ztxt)
        source_info = {"spec": source_spec, "split": source.split or "all", "unreadable": int((~valid).sum())}
        _write_manifest(out, meta, images, captions, source_info, options.dtype, len(source), len(texts))
        shutil.rmtree(work)
        distributed.barrier("index: written")
    return Searcher(out, encoder)


def _plan_build(model: Path, model_dir: Path, work: Path, source, source_spec: str, options: BuildOptions) -> None:
    """The model copied into the index and the build's plan written (or checked, when resuming)."""
    meta = _ensure_model(model, model_dir)
    plan = {
        "fingerprint": meta["fingerprint"], "source": source_spec, "split": source.split, "n": len(source),
        "chunk": options.chunk, "captions": options.captions,
    }  # fmt: skip
    if (work / "plan.json").exists():
        previous = json.loads((work / "plan.json").read_text())
        if previous != plan:
            raise InvalidIndexError(
                f"{work} holds an unfinished build of something else ({previous}); delete {work.parent} to start over"
            )
    work.mkdir(exist_ok=True)
    (work / "plan.json").write_text(json.dumps(plan) + "\n")


def _write_manifest(
    out: Path,
    meta: dict,
    images: Collection,
    captions: Collection | None,
    source: dict,
    dtype: str,
    next_image_id: int,
    next_caption_id: int,
) -> None:
    """Version 1 of an index: the manifest and both collections, committed atomically."""
    model = meta["config"]["model"]
    manifest = {
        "format": INDEX_FORMAT,
        "jaxmr_version": jaxmr.__version__,
        "version": 1,
        "created": _now(),
        "updated": _now(),
        "model": {
            "fingerprint": meta["fingerprint"], "step": meta["step"], "workdir": meta.get("workdir"),
            "embed_dim": model["embed_dim"], "image_size": meta["image_size"],
        },
        "config": meta["config"],
        "source": {k: v for k, v in source.items() if k != "unreadable"},
        "dtype": dtype,
        "images": {
            "count": len(images), "unreadable": source.get("unreadable", 0), "ann": dataclasses.asdict(images.ann),
            "calibration": images.calibration,
        },
        "captions": (
            {"count": len(captions), "ann": dataclasses.asdict(captions.ann), "calibration": captions.calibration}
            if captions is not None else None
        ),
        "next_image_id": next_image_id,
        "next_caption_id": next_caption_id,
    }  # fmt: skip
    _commit(out, manifest, {"images": images, "captions": captions})


def write_index(
    out: str | os.PathLike,
    model: str | os.PathLike,
    vectors: np.ndarray,
    rows: list[dict[str, Any]] | None = None,
    ann: AnnConfig = AnnConfig(),
    queries: np.ndarray | None = None,
    dtype: str = "float16",
    description: str = "precomputed vectors",
) -> None:
    """An image index from precomputed unit vectors [N, E] (ids 0..N-1) made with `model` (a run or an export):
    for embeddings computed elsewhere, and for benchmarks. `rows` are metadata rows (IMAGE_SCHEMA; default:
    no file, no captions); `queries` tune a tree (see `Collection.create`)."""
    out = Path(out)
    with _writer_lock(out):
        if current_version(out) is not None:
            raise InvalidIndexError(f"{out} already holds an index")
        meta = _ensure_model(Path(model), out / "model")
        if vectors.ndim != 2 or vectors.shape[1] != meta["config"]["model"]["embed_dim"]:
            raise ValueError(f"vectors must be [N, {meta['config']['model']['embed_dim']}], got {vectors.shape}")
        ids = np.arange(len(vectors), dtype=np.int64)
        if rows is None:
            table = pa.table({"id": ids, "path": pa.nulls(len(ids), pa.string()), "width": np.zeros(len(ids), np.int32),
                              "height": np.zeros(len(ids), np.int32), "captions": pa.array([[]] * len(ids),
                              pa.list_(pa.string()))}, schema=IMAGE_SCHEMA)  # fmt: skip
        else:
            table = pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)
        images = Collection.create(ids, vectors.astype(dtype), table, ann, queries=queries)
        _write_manifest(out, meta, images, None, {"spec": description, "split": "all"}, dtype, len(ids), 0)


def _ensure_model(model: Path, model_dir: Path) -> dict[str, Any]:
    """The index's own copy of the model export (made from a run, or copied from an export) and its meta."""
    if not model_dir.exists():
        if (model / "params.npz").exists():
            shutil.copytree(model, model_dir)
        else:
            export_model(model, model_dir)
    return read_export_meta(model_dir)


def _embed_images(
    source, encoder: Encoder, out: Path, work: Path, options: BuildOptions, progress: bool,
    share: tuple[int, int] = (0, 1),
) -> None:  # fmt: skip
    """Chunks c of the source's images with c % share[1] == share[0] embedded into work/images-c.npz."""
    n, size = len(source), encoder.image_size
    mine = [c for c in range(math.ceil(n / options.chunk)) if c % share[1] == share[0]]
    todo = [c for c in mine if not (work / f"images-{c:05d}.npz").exists()]
    if len(todo) < len(mine):
        log.info("resuming: %d of %d image chunks already embedded", len(mine) - len(todo), len(mine))
    total = sum(min(options.chunk, n - c * options.chunk) for c in mine)
    done = sum(min(options.chunk, n - c * options.chunk) for c in mine if c not in todo)
    bar = tqdm(total=total, initial=done, unit="img", desc="embedding images", disable=not progress, smoothing=0.1)
    with concurrent.futures.ThreadPoolExecutor(options.read_threads) as pool:
        for c in todo:
            start, stop = c * options.chunk, min(n, (c + 1) * options.chunk)
            embeddings, valid, rows = [], [], []
            for b in range(start, stop, options.batch_size):
                items = list(
                    pool.map(lambda i: _read(source, i, size, out), range(b, min(stop, b + options.batch_size)))
                )
                embeddings.append(encoder.encode_images(np.stack([it["pixels"] for it in items])))
                valid += [it["valid"] for it in items]
                rows += [json.dumps(it["row"]) for it in items]
                bar.update(len(items))
            _save_atomic(
                work / f"images-{c:05d}.npz", embeddings=np.concatenate(embeddings), valid=np.asarray(valid),
                rows=np.asarray(rows),
            )  # fmt: skip
    bar.close()


def _embed_captions(
    texts: list[str], encoder: Encoder, work: Path, options: BuildOptions, progress: bool,
    share: tuple[int, int] = (0, 1),
) -> None:  # fmt: skip
    chunk = options.chunk * 4
    mine = [c for c in range(math.ceil(len(texts) / chunk)) if c % share[1] == share[0]]
    total = sum(len(texts[c * chunk : (c + 1) * chunk]) for c in mine)
    bar = tqdm(total=total, unit="caption", desc="embedding captions", disable=not progress or not texts)
    for c in mine:
        part = texts[c * chunk : (c + 1) * chunk]
        path = work / f"captions-{c:05d}.npy"
        if not path.exists():
            z = np.concatenate([encoder.encode_texts(part[b : b + 1024]) for b in range(0, len(part), 1024)])
            tmp = path.with_name(path.name + ".tmp.npy")
            np.save(tmp, z)
            os.replace(tmp, path)
        bar.update(len(part))
    bar.close()


def index_info(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an index, with its directory's size on disk."""
    path = Path(path)
    manifest = read_manifest(path)
    version = current_version(path)
    manifest["disk_bytes"] = sum(p.stat().st_size for p in version.rglob("*") if p.is_file())
    return manifest
