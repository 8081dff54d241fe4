"""Approximate nearest-neighbour backends: the ScaNN configuration (auto-tuned by size), its builder, and exact
search in numpy and JAX (the truth every ANN setting is measured against)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmr.options import typed_options

# ScaNN's own advice (its README's "choosing parameters"): brute force for small sets, asymmetric hashing
# with exact re-scoring for mid-sized ones, and a partitioning tree in front of that above ~100k.
BRUTE_FORCE_BELOW = 20_000
TREE_FROM = 100_000
SOAR_FROM = 500_000  # auto: trees over this many vectors spill with SOAR (measured: slower at 100k, faster at 1M)
SOAR_LAMBDA = 1.5
# ah, tree_ah: candidates re-scored exactly when `reorder` is 0 (auto); a calibrated tree then keeps the fewest of
# REORDER_LADDER that still reach the target (1M x 256 with SOAR: 100 gave recall 0.9665 against 256's 0.9675,
# at p50 0.55 against 0.63 ms; bench/results/search_latency-cpu2.md, the sweep).
REORDER = 256
REORDER_LADDER = (64, 100, 128, 160, 200)


class InvalidIndexError(ValueError):
    """A missing, malformed or incompatible index directory."""


# ------------------------------------------------------------------------------------------- ScaNN config


@dataclasses.dataclass(frozen=True)
class AnnConfig:
    """How an index searches. `method` "auto" picks by collection size (see `resolve`); "exact" is a matmul."""

    method: str = "auto"  # auto | brute_force | ah | tree_ah | exact | mesh (on the devices: jaxmr.index.mesh)
    num_leaves: int = 0  # tree_ah: 0 -> about sqrt(N)
    leaves_to_search: int = 0  # tree_ah: 0 -> calibrated at build time to reach `target_recall`
    reorder: int = 0  # ah, tree_ah: candidates re-scored exactly (at least k); 0 -> REORDER, a tree's calibrated
    dims_per_block: int = 0  # ah: dimensions per 4-bit code; 0 -> 4 for a tree over >= 128-d vectors, else 2
    quantization_threshold: float = 0.2  # ah: anisotropic loss threshold for unit-norm data
    training_sample_size: int = 100_000  # tree_ah: vectors the partitioner trains on
    # tree_ah: SOAR spilling (each vector also in a second leaf with orthogonal error), e.g. 1.5: fewer leaves
    # for the same recall. 0: off; -1: auto (SOAR_LAMBDA from SOAR_FROM vectors). Deletes become tombstones
    # (see `Collection.removed`).
    soar_lambda: float = -1.0
    overretrieve_factor: float = 2.0  # tree_ah with SOAR: how far the second leaf may be from the best
    target_recall: float = 0.96  # tree_ah calibration: recall@10 vs exact on sample queries (0.95 + a margin)
    approx: float = 0.0  # mesh: each shard's top k by lax.approx_max_k with this recall target; 0: exact
    device_dtype: str = "bfloat16"  # mesh: the vectors on the devices (bfloat16 | float32)

    def __post_init__(self) -> None:
        methods = ("auto", "brute_force", "ah", "tree_ah", "exact", "mesh")
        if self.method not in methods:
            raise ValueError(f"ann.method must be one of {', '.join(methods)}, got {self.method!r}")
        if not 0 <= self.approx < 1:
            raise ValueError(f"ann.approx must be 0 (exact) or a recall target below 1, got {self.approx}")
        if self.device_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"ann.device_dtype must be bfloat16 or float32, got {self.device_dtype!r}")
        if min(self.num_leaves, self.leaves_to_search, self.dims_per_block, self.reorder) < 0:
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
        if method != "mesh" and self.reorder == 0:
            return dataclasses.replace(self, reorder=REORDER).resolve(n, d)
        if method == "mesh":
            return dataclasses.replace(self, num_leaves=0, leaves_to_search=0, soar_lambda=0.0)
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
        try:
            return cls(**{"soar_lambda": 0.0, **saved})
        except (TypeError, ValueError) as e:
            raise InvalidIndexError(f"the manifest's ann settings {saved!r} are not valid: {e}") from None

    @classmethod
    def from_spec(cls, items: Sequence[str]) -> AnnConfig:
        """From `key=value` strings, e.g. ["method=tree_ah", "leaves_to_search=64"]; unknown keys fail."""
        defaults = cls()
        kinds = {f.name: type(getattr(defaults, f.name)) for f in dataclasses.fields(cls)}
        return cls(**typed_options([item.strip().removeprefix("ann.") for item in items], kinds, "ann setting"))


def build_scann(embeddings: np.ndarray, ids: np.ndarray, config: AnnConfig):
    """A ScaNN searcher over float32 [N, E] unit vectors whose docids are `ids`; None for methods "exact" and
    "mesh" (whose searcher `jaxmr.index.mesh` makes)."""
    if config.method in ("exact", "mesh"):
        return None
    import scann  # slow to import (~1 s); only index builds and searches need it

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


def blocked_top_k(database, queries, k: int, dtype, score_dtype, recall_target: float | None, max_scores: int,
                  valid=None):  # fmt: skip
    """The best k rows of `database` [N, E] for each of `queries` [Q, E], in blocks of about max_scores / Q rows
    (`lax.scan`, a running top k) -> (rows int32 [Q, k], scores float32 [Q, k]), best first; traced (call inside
    jit or shard_map). Products in `dtype`, scores in `score_dtype`; `recall_target`: each block's top k by
    `lax.approx_max_k`; `valid` bool [N]: rows that may be returned (the others score -inf)."""
    n = database.shape[0]
    q = queries.astype(dtype)
    # float32 means float32: a GPU's default would round the products to TF32 (a 10-bit mantissa)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None

    def top(rows_block, start, valid_block):  # [Q, k] best of one block of rows, with global row numbers
        scores = jnp.einsum("qe,ne->qn", q, rows_block, preferred_element_type=score_dtype, precision=precision)
        if valid_block is not None:
            scores = jnp.where(valid_block[None], scores, -jnp.inf)
        keep = min(k, rows_block.shape[0])
        if recall_target is None:
            values, at = jax.lax.top_k(scores, keep)
        else:
            values, at = jax.lax.approx_max_k(scores, keep, recall_target=recall_target)
        return values, (start + at).astype(jnp.int32)

    def merge(a, b):
        values, where = jax.lax.top_k(jnp.concatenate([a[0], b[0]], axis=1), k)
        return values, jnp.take_along_axis(jnp.concatenate([a[1], b[1]], axis=1), where, axis=1)

    chunk = min(n, max(k, max_scores // max(len(q), 1)))
    full = n // chunk
    blocks = database[: full * chunk].reshape(full, chunk, -1)
    masks = valid[: full * chunk].reshape(full, chunk) if valid is not None else None
    best = top(blocks[0], 0, masks[0] if masks is not None else None)
    if full > 1:
        starts = jnp.arange(1, full, dtype=jnp.int32) * chunk
        if masks is None:
            step = lambda best, args: (merge(best, top(*args, None)), None)
            best, _ = jax.lax.scan(step, best, (blocks[1:], starts))
        else:
            step = lambda best, args: (merge(best, top(*args)), None)
            best, _ = jax.lax.scan(step, best, (blocks[1:], starts, masks[1:]))
    if full * chunk < n:  # the rows left over after the whole chunks
        rest = valid[full * chunk :] if valid is not None else None
        best = merge(best, top(database[full * chunk :], full * chunk, rest))
    return best[1], best[0].astype(jnp.float32)


class JaxExactSearch:
    """Exact maximum inner product search as one jitted XLA program, with the database resident on the device.

    database [N, E] is kept in `dtype` (bfloat16 halves the bytes a query reads: on a GPU the search is
    memory-bound). A batch of Q queries is scored in chunks of about `max_scores` / Q rows (`lax.scan`, scores
    accumulated in float32) keeping a running top-k, so 1,024 queries against 1M rows never hold the whole
    [Q, N] score matrix while a single query reads the database in one pass. `__call__(queries [Q, E], k)` ->
    (rows int64 [Q, k'], scores float32 [Q, k']), k' = min(k, N), best first. Each (Q, k) compiles once.

    `database` may already be a `jax.Array` on the device (no host round trip: 10M x 256 is generated there by
    the accelerator benchmark). `recall_target` (0 < r < 1) makes each block's top-k `lax.approx_max_k` with that
    expected recall (the TPU-KNN method: near peak FLOP/s on a TPU; XLA falls back to an exact top-k elsewhere);
    the blocks' candidates are still merged exactly. `score_dtype` "bfloat16" writes the [Q, chunk] scores in
    bfloat16 (half the memory traffic of a batched search, whose float32 scores at Q = 1,024 over 1M rows are
    4 GB written and read; near-ties round together, so recall against float32 may drop a little).
    """

    def __init__(
        self,
        database: np.ndarray | jax.Array,
        dtype: str = "float32",
        max_scores: int = 1 << 25,
        device=None,
        recall_target: float | None = None,
        score_dtype: str = "float32",
    ):
        if recall_target is not None and not 0 < recall_target < 1:
            raise ValueError(f"recall_target must lie strictly between 0 and 1, got {recall_target}")
        self.n, self.dtype, self.max_scores = len(database), jnp.dtype(dtype), max_scores
        self.score_dtype = jnp.dtype(score_dtype)
        self.recall_target = recall_target
        if not isinstance(database, jax.Array):
            database = np.asarray(database, np.float32)
        self.database = jax.device_put(jnp.asarray(database, self.dtype), device)
        self.nbytes = self.database.nbytes
        self._search = jax.jit(self._search_impl, static_argnames="k")

    def _search_impl(self, database, queries, k: int):
        return blocked_top_k(database, queries, k, self.dtype, self.score_dtype, self.recall_target, self.max_scores)

    def __call__(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.n)
        rows, scores = self._search(
            self.database, np.asarray(queries, np.float32).reshape(-1, self.database.shape[1]), k
        )
        return np.asarray(rows, np.int64), np.asarray(scores, np.float32)
