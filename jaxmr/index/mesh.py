"""Search on the mesh: an index resident on every device JAX sees, sharded by rows, searched in `shard_map`.

The first piece of the mesh backend (issue 23). Vectors live on the devices (bfloat16 by default), split by rows
over a 1-D mesh of all devices (of every process); a batch of queries is scored shard by shard, each shard keeps
its top k (exact, or `lax.approx_max_k` with a recall target), and the shards' candidates are gathered and merged
into the global top k on the devices: no host round trip between shards. Query batches are padded to fixed
buckets and k to a power of two, so a live server compiles each (bucket, k) once.

Writes do not recompile: rows go into free slots (an eighth of room at the start) of a capacity that doubles
when full (a new capacity is the one change that compiles again), deletes clear a validity mask, and `compact`
packs the live rows once the dead share passes a threshold.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmr.index.ann import blocked_top_k
from jaxmr.sharding import make_mesh

AXIS = "rows"
BUCKETS = (1, 8, 64, 256, 1024)  # query batch sizes compiled; larger batches run in pieces of the largest
K_MIN = 16  # k is compiled as a power of two from 16: a server's pages (10, 20, ... + a few) share few programs
COMPACT_DEAD_SHARE = 0.25


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class MeshSearch:
    """Maximum inner product search over vectors sharded by rows on `mesh` (default: every device, one axis).

    vectors [N, E] (any float array that slices, e.g. a memory-mapped .npy: each process reads only the rows its
    devices hold) with int64 ids [N] (unique). `search(queries [Q, E], k)` -> (ids int64 [Q, k'], scores float32
    [Q, k']), k' = min(k, live rows), best first; in a multi-process run every process calls it with the same
    queries and gets the same answer. `recall_target` (0 < r < 1): each shard's top k by `lax.approx_max_k`
    (exact elsewhere than on a TPU); None: exact. `valid` bool [N]: rows that may be returned (default all; an
    index's rows deleted in its log stay in place, unreturnable).
    """

    def __init__(
        self,
        vectors: np.ndarray,
        ids: np.ndarray,
        dtype: str = "bfloat16",
        recall_target: float | None = None,
        mesh: jax.sharding.Mesh | None = None,
        max_scores: int = 1 << 24,
        valid: np.ndarray | None = None,
    ):
        ids = np.asarray(ids, np.int64)
        if len(np.shape(vectors)) != 2 or len(ids) != len(vectors):
            raise ValueError(f"vectors must be [N, E] with N ids, got {np.shape(vectors)} and {ids.shape}")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique")
        if valid is not None and np.shape(valid) != ids.shape:
            raise ValueError(f"valid must be [N] like the ids, got {np.shape(valid)}")
        if recall_target is not None and not 0 < recall_target < 1:
            raise ValueError(f"recall_target must lie strictly between 0 and 1, got {recall_target}")
        self.mesh = mesh or make_mesh(((AXIS, -1),))
        self.devices = self.mesh.devices.size
        self.dim, self.dtype = np.shape(vectors)[1], jnp.dtype(dtype)
        self.recall_target, self.max_scores = recall_target, max_scores
        self._rows = NamedSharding(self.mesh, P(AXIS, None))
        self._mask = NamedSharding(self.mesh, P(AXIS))
        self._replicated = NamedSharding(self.mesh, P())
        self._compiled: dict[int, object] = {}
        self._load(vectors, ids, capacity=self._capacity_for(len(ids)), live=valid)

    # ---- storage

    def _capacity_for(self, n: int) -> int:
        """Room for n rows and an eighth more, in whole blocks of 256 rows per device (every slot is scored, free
        or not: room doubled at the start made a search do twice the work)."""
        return _round_up(max(n + n // 8, 256 * self.devices), 256 * self.devices)

    def _load(self, vectors: np.ndarray, ids: np.ndarray, capacity: int, live: np.ndarray | None = None) -> None:
        """Puts rows [0, n) of `vectors` (any array that slices: a memory map reads only what is asked) into a
        capacity of slots; each process reads only the rows of its own devices' shards. `live`: see `valid`."""
        n = len(ids)
        live = np.ones(n, bool) if live is None else np.asarray(live, bool)
        dtype = self.dtype

        def rows(index: tuple[slice, ...]) -> np.ndarray:  # one shard's slots [start, stop)
            start, stop, _ = index[0].indices(capacity)
            out = np.zeros((stop - start, self.dim), dtype)
            lo, hi = min(start, n), min(stop, n)
            out[: hi - lo] = np.asarray(vectors[lo:hi], np.float32).astype(dtype)
            self.rows_read += hi - lo
            return out

        def valid(index: tuple[slice, ...]) -> np.ndarray:
            start, stop, _ = index[0].indices(capacity)
            out = np.zeros(stop - start, bool)
            lo, hi = min(start, n), min(stop, n)
            out[: hi - lo] = live[lo:hi]
            return out

        self.rows_read = 0
        self.data = jax.make_array_from_callback((capacity, self.dim), self._rows, rows)
        self.valid = jax.make_array_from_callback((capacity,), self._mask, valid)
        self.ids = np.full(capacity, -1, np.int64)
        self.ids[:n] = np.where(live, ids, -1)
        self._rows_by_id: dict[int, int] | None = None  # built on the first write
        self._used, self._live = n, int(live.sum())

    @property
    def _row_of(self) -> dict[int, int]:
        if self._rows_by_id is None:
            self._rows_by_id = {int(i): r for r, i in enumerate(self.ids[: self._used]) if i >= 0}
        return self._rows_by_id

    @property
    def local_rows(self) -> int:
        """Slots held by this process's devices (capacity / processes when every process has as many)."""
        return sum(shard.data.shape[0] for shard in self.data.addressable_shards)

    @property
    def capacity(self) -> int:
        return len(self.ids)

    def __len__(self) -> int:
        return self._live

    @property
    def dead(self) -> int:
        """Deleted rows still taking room (until `compact`)."""
        return self._used - self._live

    # ---- search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {queries.shape}")
        k = min(k, self._live)
        if k < 1 or len(queries) == 0:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        k_compiled = self._k_compiled(k)
        out_rows, out_scores = [], []
        for start in range(0, len(queries), BUCKETS[-1]):
            part = queries[start : start + BUCKETS[-1]]
            bucket = next(b for b in BUCKETS if b >= len(part))
            padded = np.zeros((bucket, self.dim), np.float32)
            padded[: len(part)] = part
            given = jax.make_array_from_callback(padded.shape, self._replicated, padded.__getitem__)
            rows, scores = self._search_fn(k_compiled)(self.data, self.valid, given)
            out_rows.append(np.asarray(rows)[: len(part), :k])
            out_scores.append(np.asarray(scores)[: len(part), :k])
        rows, scores = np.concatenate(out_rows), np.concatenate(out_scores)
        return self.ids[rows], scores

    def _k_compiled(self, k: int) -> int:
        return min(max(1 << (k - 1).bit_length(), K_MIN), self.capacity)

    def warm_up(self, max_batch: int, max_k: int) -> None:
        """Compiles the searches of every bucket up to `max_batch` queries and every compiled k up to `max_k`
        (what a server may ask), so that none compiles while serving."""
        ks = sorted({self._k_compiled(k) for k in range(1, max_k + 1)})
        buckets = [b for b in BUCKETS if b < max_batch] + [next((b for b in BUCKETS if b >= max_batch), BUCKETS[-1])]
        for k in ks:
            for b in buckets:
                self.search(np.zeros((b, self.dim), np.float32), k)

    def compiled_count(self) -> int:
        """Search programs compiled so far (a bucket, k and capacity each)."""
        return sum(fn._cache_size() for fn in self._compiled.values())

    def _search_fn(self, k: int):
        """The jitted search for a compiled k (one per k; it compiles once per bucket and capacity)."""
        if k not in self._compiled:
            self._compiled[k] = self._make_search(k)
        return self._compiled[k]

    def _make_search(self, k: int):
        dtype, score_dtype, recall, max_scores = self.dtype, jnp.float32, self.recall_target, self.max_scores

        def shard(data, valid, queries):  # data [C/D, E], valid [C/D], queries [B, E] (every device)
            local_k = min(k, data.shape[0])  # a shard holds capacity / devices rows; together they hold k
            rows, scores = blocked_top_k(data, queries, local_k, dtype, score_dtype, recall, max_scores, valid)
            rows = rows + jax.lax.axis_index(AXIS) * data.shape[0]
            all_scores = jax.lax.all_gather(scores, AXIS, axis=1, tiled=True)  # [B, D * k]
            all_rows = jax.lax.all_gather(rows, AXIS, axis=1, tiled=True)
            best, at = jax.lax.top_k(all_scores, k)
            return jnp.take_along_axis(all_rows, at, axis=1), best

        mapped = jax.shard_map(shard, mesh=self.mesh, in_specs=(P(AXIS, None), P(AXIS), P()), out_specs=(P(), P()),
                               check_vma=False)  # fmt: skip
        return jax.jit(mapped)

    # ---- writes

    def add(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Adds rows (new ids) into free slots; the capacity doubles when they run out (the one recompile)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        vectors = np.asarray(vectors, np.float32).reshape(len(ids), self.dim)
        if any(int(i) in self._row_of for i in ids) or len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be new and unique")
        if self._used + len(ids) > self.capacity:  # grows geometrically: few capacities, few compiles
            self.compact(max(self._capacity_for(self._live + len(ids)), 2 * self.capacity))
        rows = np.arange(self._used, self._used + len(ids))
        self._write(rows, vectors, True)
        self.ids[rows] = ids
        self._row_of.update((int(i), int(r)) for i, r in zip(ids, rows, strict=True))
        self._used += len(ids)
        self._live += len(ids)

    def delete(self, ids: Sequence[int]) -> int:
        """Clears the rows of these ids (unknown ids ignored); returns how many there were. Compacts once the
        dead share passes COMPACT_DEAD_SHARE."""
        rows = np.asarray([self._row_of.pop(int(i)) for i in np.unique(ids) if int(i) in self._row_of], np.int64)
        if len(rows):
            self._write(rows, None, False)
            self.ids[rows] = -1
            self._live -= len(rows)
            if self.dead > COMPACT_DEAD_SHARE * self._used:
                self.compact()
        return len(rows)

    def compact(self, capacity: int | None = None) -> None:
        """Packs the live rows at the front, into `capacity` slots (default: the same rule as at the start, never
        fewer than now: no recompile unless it changes)."""
        keep = np.flatnonzero(np.asarray(self.valid))
        vectors = np.asarray(self.data[keep], np.float32) if len(keep) else np.zeros((0, self.dim), np.float32)
        self._load(vectors, self.ids[keep], capacity or max(self.capacity, self._capacity_for(len(keep))))

    def _write(self, rows: np.ndarray, vectors: np.ndarray | None, valid: bool) -> None:
        """Sets rows of the device arrays: padded to a power of two of rows (out-of-range rows are dropped), so
        writes of any size reuse a few compiled updates."""
        size = 1 << max(len(rows) - 1, 0).bit_length()
        at = np.full(size, self.capacity, np.int64)  # past the end: dropped
        at[: len(rows)] = rows
        values = np.zeros((size, self.dim), np.float32)
        if vectors is not None:
            values[: len(rows)] = vectors
        self.data, self.valid = _update(self.data, self.valid, jnp.asarray(at), jnp.asarray(values, self.dtype),
                                        valid, vectors is not None)  # fmt: skip


@functools.partial(jax.jit, static_argnames=("valid", "set_data"), donate_argnums=(0, 1))
def _update(data, mask, rows, values, valid: bool, set_data: bool):
    if set_data:
        data = data.at[rows].set(values, mode="drop")
    return data, mask.at[rows].set(valid, mode="drop")
