"""Contrastive losses for dual encoders: pure functions returning `(loss, metrics)`.

Embeddings come L2-normalised: zimg float [B, D], ztxt float [B, D]; row k of both is one (image, caption)
pair. `ids` int [B] names the image of each row: rows with equal ids are positives of one another, which is
how a batch holding several captions of one image gets several positives (default: every row its own id).
`t` is the (positive) logit scale, `b` the sigmoid bias; both are scalars the model learns.

Each loss has a sharded form for a batch split over a mesh axis, written with `jax.shard_map`:
  - "gather": every device scores its b local rows against all B all-gathered columns: memory O(b * B) per
    device; gradients flow back through the gather (its transpose is a reduce-scatter), so the open_clip
    #616 class of bug — gathered columns treated as constants — cannot happen.
  - "ring" (softmax, sigmoid): column blocks travel round the ring with `ppermute` and are scored in tiles
    of `chunk` columns; softmax keeps an online log-sum-exp per row, so no device ever holds more than one
    [b, chunk] tile of logits: memory linear in b, also in the backward pass, where each tile is
    rematerialised.
The triplet loss mines its negatives over the whole global batch (gather form).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

Metrics = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Metrics]]
Negatives = Literal["hardest", "semi_hard", "all"]
NEG_INF = -1e30  # finite, so that 0 * NEG_INF stays 0 in masked sums


def _check(zimg: jax.Array, ztxt: jax.Array, ids: jax.Array | None) -> jax.Array:
    if zimg.ndim != 2 or zimg.shape != ztxt.shape:
        raise ValueError(f"zimg and ztxt must both be [B, D]; got {zimg.shape} and {ztxt.shape}")
    if ids is None:
        return jnp.arange(zimg.shape[0], dtype=jnp.int32)
    if ids.shape != zimg.shape[:1]:
        raise ValueError(f"ids must be [B] = [{zimg.shape[0]}], got {ids.shape}")
    return ids


# ------------------------------------------------------------------------------ per-block building blocks
# Each works on a block of rows (the anchors) against a block of columns and returns sums, so the same code
# serves the single-device loss, the gather form (one block of all columns) and the ring form (n blocks).


def _softmax_rows(logits: jax.Array, positive: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row: (log-sum-exp over columns, sum of positive logits, number of positives). [R] each."""
    return jax.nn.logsumexp(logits, axis=1), jnp.sum(jnp.where(positive, logits, 0.0), 1), positive.sum(1)


def _softmax_direction(lse, pos_sum, pos_count, correct) -> tuple[jax.Array, jax.Array]:
    """Sum over rows of the multi-positive InfoNCE loss (mean over a row's positives of -log p), and of hits."""
    loss = lse - pos_sum / jnp.maximum(pos_count, 1)
    return jnp.sum(loss), jnp.sum(correct)


def softmax_loss(
    zimg: jax.Array, ztxt: jax.Array, t: jax.Array, ids: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
    """Symmetric InfoNCE (CLIP), multi-positive when ids repeat.

    zimg, ztxt: [B, D]; t: scalar logit scale; ids: int [B]. Returns (scalar loss, metrics).
    """
    ids = _check(zimg, ztxt, ids)
    logits = t * zimg @ ztxt.T  # [B images, B texts]
    positive = ids[:, None] == ids[None, :]
    n = zimg.shape[0]
    i2t, i2t_hits = _softmax_direction(*_softmax_rows(logits, positive), _hits(logits, positive))
    t2i, t2i_hits = _softmax_direction(*_softmax_rows(logits.T, positive.T), _hits(logits.T, positive.T))
    return _softmax_result(i2t, t2i, i2t_hits, t2i_hits, n)


def _hits(logits: jax.Array, positive: jax.Array) -> jax.Array:
    return jnp.take_along_axis(positive, jnp.argmax(logits, 1)[:, None], 1)[:, 0]


def _softmax_result(i2t, t2i, i2t_hits, t2i_hits, n) -> tuple[jax.Array, Metrics]:
    i2t, t2i = i2t / n, t2i / n
    metrics = {"i2t_loss": i2t, "t2i_loss": t2i, "i2t_acc": i2t_hits / n, "t2i_acc": t2i_hits / n}
    return (i2t + t2i) / 2, metrics


def sigmoid_loss(
    zimg: jax.Array, ztxt: jax.Array, t: jax.Array, b: jax.Array, ids: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
    """SigLIP: every (image, text) pair is a binary decision; -sum log sigmoid(z * (t x.y + b)) / B.

    zimg, ztxt: [B, D]; t, b: scalars; ids: int [B]. Returns (scalar loss, metrics).
    """
    ids = _check(zimg, ztxt, ids)
    loss_sum, pos_logit, pos_count = _sigmoid_block(zimg, ztxt, t, b, ids, ids)
    return _sigmoid_result(loss_sum, pos_logit, pos_count, zimg.shape[0])


def _sigmoid_block(x, y, t, b, row_ids, col_ids):
    logits = t * x @ y.T + b
    positive = row_ids[:, None] == col_ids[None, :]
    sign = jnp.where(positive, 1.0, -1.0)
    # standard sigmoid computes everything twice; here we know where the positives are
    loss_sum = -jnp.sum(jax.nn.log_sigmoid(sign * logits))
    return loss_sum, jnp.sum(jnp.where(positive, logits, 0.0)), positive.sum()


def _sigmoid_result(loss_sum, pos_logit, pos_count, n) -> tuple[jax.Array, Metrics]:
    loss = loss_sum / n
    return loss, {"sigmoid_loss": loss, "pos_logit_mean": pos_logit / jnp.maximum(pos_count, 1)}


def _triplet_rows(sim: jax.Array, positive: jax.Array, margin: float, negatives: Negatives) -> jax.Array:
    """Per anchor row: triplet loss with its hardest positive and the chosen negatives. sim: [R, C]."""
    pos_sim = jnp.min(jnp.where(positive, sim, jnp.inf), axis=1, keepdims=True)  # batch-hard positive
    violation = jax.nn.relu(margin - pos_sim + sim)
    negative = ~positive
    if negatives == "hardest":  # VSE++
        return jnp.max(jnp.where(negative, violation, 0.0), axis=1)
    if negatives == "all":  # mean over the negatives that violate the margin
        violating = negative & (violation > 0)
        return jnp.sum(jnp.where(violating, violation, 0.0), 1) / jnp.maximum(violating.sum(1), 1)
    if negatives == "semi_hard":  # FaceNet: the hardest negative that is still less similar than the positive
        easier = negative & (sim < pos_sim)
        semi = jnp.max(jnp.where(easier, sim, NEG_INF), axis=1)
        hardest = jnp.max(jnp.where(negative, sim, NEG_INF), axis=1)
        chosen = jnp.where(easier.any(1), semi, hardest)
        return jnp.where(negative.any(1), jax.nn.relu(margin - pos_sim[:, 0] + chosen), 0.0)
    raise ValueError(f"negatives must be 'hardest', 'semi_hard' or 'all', got {negatives!r}")


def triplet_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    ids: jax.Array | None = None,
    *,
    margin: float = 0.2,
    negatives: Negatives = "hardest",
) -> tuple[jax.Array, Metrics]:
    """Margin ranking loss on cosine similarities, image->text and text->image, averaged over anchors.

    zimg, ztxt: [B, D]; ids: int [B]. `negatives`: "hardest" (VSE++), "semi_hard" (FaceNet), "all" (mean
    over violating negatives). Returns (scalar loss, metrics).
    """
    ids = _check(zimg, ztxt, ids)
    sim = zimg @ ztxt.T
    positive = ids[:, None] == ids[None, :]
    i2t = jnp.sum(_triplet_rows(sim, positive, margin, negatives))
    t2i = jnp.sum(_triplet_rows(sim.T, positive.T, margin, negatives))
    return _triplet_result(i2t, t2i, zimg.shape[0])


def _triplet_result(i2t, t2i, n) -> tuple[jax.Array, Metrics]:
    i2t, t2i = i2t / n, t2i / n
    return (i2t + t2i) / 2, {"i2t_loss": i2t, "t2i_loss": t2i}


# ------------------------------------------------------------------------------------------- sharded forms


def _local_ids(ids: jax.Array | None, b: int, axis) -> jax.Array:
    if ids is not None:
        return ids
    return jax.lax.axis_index(axis) * b + jnp.arange(b, dtype=jnp.int32)


def _gather(x: jax.Array, axis) -> jax.Array:
    return jax.lax.all_gather(x, axis, tiled=True)


def _softmax_gather(zimg, ztxt, t, ids, *, axis):
    b = zimg.shape[0]
    ids = _local_ids(ids, b, axis)
    all_img, all_txt, all_ids = _gather(zimg, axis), _gather(ztxt, axis), _gather(ids, axis)
    n = b * jax.lax.axis_size(axis)
    sums = []
    for rows, cols in ((zimg, all_txt), (ztxt, all_img)):
        logits = t * rows @ cols.T  # [b, B]
        positive = ids[:, None] == all_ids[None, :]
        sums.append(_softmax_direction(*_softmax_rows(logits, positive), _hits(logits, positive)))
    (i2t, i2t_hits), (t2i, t2i_hits) = jax.lax.psum(sums, axis)
    return _softmax_result(i2t, t2i, i2t_hits, t2i_hits, n)


def _varying(tree, axis):
    """Marks per-device accumulators as varying over `axis`, as scan carries inside shard_map must be."""
    return jax.tree.map(lambda x: jax.lax.pcast(x, axis, to="varying"), tree)


def _in_chunks(x: jax.Array, chunk: int | None) -> jax.Array:
    """[b, ...] -> [b // c, c, ...] with c the largest divisor of b that is <= chunk (all of b when None)."""
    b = x.shape[0]
    c = b if chunk is None or b <= chunk else max(d for d in range(1, chunk + 1) if b % d == 0)
    return x.reshape(b // c, c, *x.shape[1:])


def _ring(axis):
    size = jax.lax.axis_size(axis)
    return size, [(k, (k + 1) % size) for k in range(size)]


def _softmax_ring(zimg, ztxt, t, ids, *, axis, chunk: int | None = 256):
    b = zimg.shape[0]
    ids = _local_ids(ids, b, axis)
    size, perm = _ring(axis)

    def direction_init():
        # running max, running sum of exp(logit - max), positive-logit sum, positive count, best logit, best is positive
        return (jnp.full((b,), NEG_INF), jnp.zeros((b,)), jnp.zeros((b,)), jnp.zeros((b,)),
                jnp.full((b,), NEG_INF), jnp.zeros((b,), bool))  # fmt: skip

    def update(state, logits, positive):
        m, s, pos_sum, pos_count, best, best_pos = state
        m_new = jnp.maximum(m, logits.max(1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(1)
        pos_sum = pos_sum + jnp.where(positive, logits, 0.0).sum(1)
        pos_count = pos_count + positive.sum(1)
        block_best = logits.max(1)
        block_best_pos = jnp.take_along_axis(positive, jnp.argmax(logits, 1)[:, None], 1)[:, 0]
        better = block_best > best
        return (
            m_new,
            s,
            pos_sum,
            pos_count,
            jnp.where(better, block_best, best),
            jnp.where(better, block_best_pos, best_pos),
        )

    @jax.checkpoint  # in the backward pass too, only one [b, chunk] tile of logits is alive at a time
    def visit(states, columns):
        img_cols, txt_cols, col_ids = columns
        i2t_state, t2i_state = states
        positive = ids[:, None] == col_ids[None, :]
        i2t_state = update(i2t_state, t * zimg @ txt_cols.T, positive)
        t2i_state = update(t2i_state, t * ztxt @ img_cols.T, positive)
        return (i2t_state, t2i_state), None

    @jax.checkpoint
    def step(carry, _):
        block, i2t_state, t2i_state = carry
        tiles = jax.tree.map(lambda x: _in_chunks(x, chunk), block)
        (i2t_state, t2i_state), _ = jax.lax.scan(visit, (i2t_state, t2i_state), tiles)
        return (jax.lax.ppermute(block, axis, perm), i2t_state, t2i_state), None

    init = ((zimg, ztxt, ids), _varying(direction_init(), axis), _varying(direction_init(), axis))
    (_, i2t_state, t2i_state), _ = jax.lax.scan(step, init, None, length=size)
    sums = []
    for m, s, pos_sum, pos_count, _, best_pos in (i2t_state, t2i_state):
        sums.append(_softmax_direction(m + jnp.log(s), pos_sum, pos_count, best_pos))
    (i2t, i2t_hits), (t2i, t2i_hits) = jax.lax.psum(sums, axis)
    return _softmax_result(i2t, t2i, i2t_hits, t2i_hits, b * size)


def _sigmoid_gather(zimg, ztxt, t, b_, ids, *, axis):
    b = zimg.shape[0]
    ids = _local_ids(ids, b, axis)
    sums = _sigmoid_block(zimg, _gather(ztxt, axis), t, b_, ids, _gather(ids, axis))
    return _sigmoid_result(*jax.lax.psum(sums, axis), b * jax.lax.axis_size(axis))


def _sigmoid_ring(zimg, ztxt, t, b_, ids, *, axis, chunk: int | None = 256):
    b = zimg.shape[0]
    ids = _local_ids(ids, b, axis)
    size, perm = _ring(axis)

    @jax.checkpoint
    def visit(sums, columns):
        txt_cols, col_ids = columns
        return jax.tree.map(jnp.add, sums, _sigmoid_block(zimg, txt_cols, t, b_, ids, col_ids)), None

    @jax.checkpoint
    def step(carry, _):
        block, sums = carry
        sums, _ = jax.lax.scan(visit, sums, jax.tree.map(lambda x: _in_chunks(x, chunk), block))
        return (jax.lax.ppermute(block, axis, perm), sums), None

    zero = (jnp.zeros(()), jnp.zeros(()), jnp.zeros((), jnp.int32))
    (_, sums), _ = jax.lax.scan(step, ((ztxt, ids), _varying(zero, axis)), None, length=size)
    return _sigmoid_result(*jax.lax.psum(sums, axis), b * size)


def _triplet_gather(zimg, ztxt, ids, *, axis, margin: float = 0.2, negatives: Negatives = "hardest"):
    b = zimg.shape[0]
    ids = _local_ids(ids, b, axis)
    all_ids = _gather(ids, axis)
    positive = ids[:, None] == all_ids[None, :]
    i2t = jnp.sum(_triplet_rows(zimg @ _gather(ztxt, axis).T, positive, margin, negatives))
    t2i = jnp.sum(_triplet_rows(ztxt @ _gather(zimg, axis).T, positive, margin, negatives))
    i2t, t2i = jax.lax.psum((i2t, t2i), axis)
    return _triplet_result(i2t, t2i, b * jax.lax.axis_size(axis))


_SHARDED = {
    ("softmax", "gather"): _softmax_gather,
    ("softmax", "ring"): _softmax_ring,
    ("sigmoid", "gather"): _sigmoid_gather,
    ("sigmoid", "ring"): _sigmoid_ring,
    ("triplet", "gather"): _triplet_gather,
}
# How many scalar arguments (t, b) each loss takes between the embeddings and the ids.
_SCALARS = {"softmax": 1, "sigmoid": 2, "triplet": 0}
LOSSES: dict[str, LossFn] = {"softmax": softmax_loss, "sigmoid": sigmoid_loss, "triplet": triplet_loss}


def sharded_loss(
    name: str, mesh: Mesh, axis: str | tuple[str, ...] = "data", form: str = "gather", **options
) -> LossFn:
    """The sharded form of loss `name` for a batch split over `axis` of `mesh`.

    The returned function takes the same arguments as the single-device loss, as global arrays whose batch
    dimension is sharded over `axis`; `ids`, when given, must be global image ids.
    """
    if (name, form) not in _SHARDED:
        forms = [f for n, f in _SHARDED if n == name]
        raise ValueError(f"no {form!r} form of the {name!r} loss; it has: {', '.join(forms) or 'none'}")
    local = functools.partial(_SHARDED[name, form], axis=axis, **options)
    scalars = _SCALARS[name]

    def loss(zimg, ztxt, *args):
        args = list(args) + [None] * (scalars + 1 - len(args))
        scalar_args, ids = args[:scalars], args[scalars]
        _check(zimg, ztxt, ids)
        in_specs = (P(axis), P(axis), *([P()] * scalars), P(axis) if ids is not None else P())
        mapped = jax.shard_map(
            lambda zi, zt, *rest: local(zi, zt, *rest), mesh=mesh, in_specs=in_specs, out_specs=(P(), P())
        )
        return mapped(zimg, ztxt, *scalar_args, ids)

    return loss
