"""Batch nearest neighbours on the mesh: every query of a large set against an index's live vectors, written as
(query, neighbour, rank, score) rows of a parquet file.

For pretraining pipelines: near-duplicate removal between training and test data (`threshold`), hard-negative
mining, evaluation over big galleries. The index's vectors go onto every device of every process
(`jaxmr.index.mesh.MeshSearch`, rows sharded: each process reads only the rows its devices hold from the
memory-mapped base, plus the log's adds); every process passes the same queries (each reads them itself: a
file, or the index's own vectors) and gets the same answers; process 0 writes the file (atomically: a reader
sees the whole file or none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from jaxmr import distributed
from jaxmr.files import atomic_path
from jaxmr.index.mesh import MeshSearch
from jaxmr.index.store import LiveArrays, live_arrays

SCHEMA = pa.schema([("query", pa.int64()), ("neighbor", pa.int64()), ("rank", pa.int32()), ("score", pa.float32())])


@dataclasses.dataclass(frozen=True)
class KnnOptions:
    k: int = 100
    threshold: float | None = None  # keep only pairs scoring at least this (near duplicates)
    exclude_self: bool = False  # drop a query's own id from its neighbours (queries from the same index)
    batch: int = 1024  # queries per search
    dtype: str = "bfloat16"  # the vectors on the devices
    approx: float = 0.0  # each shard's top k by approx_max_k with this recall target; 0: exact

    def __post_init__(self) -> None:
        if self.k < 1 or self.batch < 1:
            raise ValueError(f"k and batch must be at least 1, got k={self.k}, batch={self.batch}")
        if self.threshold is not None and not -1 <= self.threshold <= 1:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if not 0 <= self.approx < 1:
            raise ValueError(f"approx must be 0 (exact) or a recall target below 1, got {self.approx}")


def load_mesh(arrays: LiveArrays, options: KnnOptions) -> MeshSearch:
    """The live rows on the mesh (each process reading only its devices' rows)."""
    return MeshSearch(arrays.vectors, arrays.ids, dtype=options.dtype, recall_target=options.approx or None,
                      valid=arrays.valid)  # fmt: skip


def knn(
    index: str | os.PathLike,
    queries: np.ndarray,
    query_ids: np.ndarray,
    out: str | os.PathLike,
    target: str = "images",
    options: KnnOptions = KnnOptions(),
    progress: bool = True,
    mesh: MeshSearch | None = None,
) -> dict[str, Any]:
    """The k nearest live `target` vectors of each query (float32 [Q, E], unit norm; ids int64 [Q]) written to
    `out` (parquet, SCHEMA; process 0). Returns a summary: counts, pairs written, seconds, queries per second
    (the search alone, after compiling)."""
    queries = np.asarray(queries, np.float32)
    query_ids = np.asarray(query_ids, np.int64)
    if queries.ndim != 2 or len(query_ids) != len(queries):
        raise ValueError(f"queries must be [Q, E] with Q ids, got {queries.shape} and {query_ids.shape}")
    start = time.perf_counter()
    arrays = live_arrays(index, target)
    dim = arrays.vectors.shape[1]
    if queries.shape[1] != dim:
        raise ValueError(f"queries have {queries.shape[1]} dimensions, the index's {target} {dim}")
    mesh = mesh or load_mesh(arrays, options)
    loaded = time.perf_counter()
    k = options.k + options.exclude_self
    primary = distributed.is_primary()
    written, searched = 0, 0.0
    mesh.search(queries[: min(options.batch, len(queries))], k)  # compiles (not timed)
    with atomic_path(out) if primary else contextlib.nullcontext() as tmp:  # the file is process 0's
        writer = pq.ParquetWriter(tmp, SCHEMA) if primary else None
        bar = tqdm(total=len(queries), unit="query", desc="knn", disable=not (progress and primary))
        for begin in range(0, len(queries), options.batch):
            part = slice(begin, begin + options.batch)
            t = time.perf_counter()
            ids, scores = mesh.search(queries[part], k)
            searched += time.perf_counter() - t
            table = _pairs(query_ids[part], ids, scores, options)
            if writer is not None:
                writer.write_table(table)
            written += table.num_rows
            bar.update(len(ids))
        bar.close()
        if writer is not None:
            writer.close()
    distributed.barrier("knn: written")
    return {
        "queries": len(queries), "target": target, "live": arrays.count, "k": options.k, "pairs": written,
        "threshold": options.threshold, "devices": mesh.devices, "processes": distributed.share()[1],
        "capacity": mesh.capacity, "rows_this_process": mesh.local_rows, "vectors_read": mesh.rows_read,
        "load_seconds": round(loaded - start, 3),
        "search_seconds": round(searched, 3), "queries_per_second": round(len(queries) / max(searched, 1e-9), 1),
    }  # fmt: skip


def _pairs(query_ids: np.ndarray, ids: np.ndarray, scores: np.ndarray, options: KnnOptions) -> pa.Table:
    """One batch's (query, neighbour, rank, score) rows: self-matches dropped when asked (ranks renumbered),
    then the best k, then those under the threshold."""
    keep = ids >= 0
    if options.exclude_self:
        keep &= ids != query_ids[:, None]
    rank = np.cumsum(keep, axis=1) - 1
    keep &= rank < options.k
    if options.threshold is not None:
        keep &= scores >= options.threshold
    rows, cols = np.nonzero(keep)
    return pa.table({"query": query_ids[rows], "neighbor": ids[rows, cols], "rank": rank[rows, cols].astype(np.int32),
                     "score": scores[rows, cols].astype(np.float32)}, schema=SCHEMA)  # fmt: skip
