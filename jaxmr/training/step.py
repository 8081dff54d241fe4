"""The train state, the optimizer, the loss adapter and one jitted `train_step` (with GradCache), built once
per config and mesh (`build`)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmr import losses
from jaxmr.config import LossConfig, OptimConfig, TrainConfig
from jaxmr.export import load_export
from jaxmr.models import DualEncoder, l2_normalize
from jaxmr.models.dual_encoder import model_graph
from jaxmr.models.pretrained import has_pretrained_towers, load_pretrained_towers
from jaxmr.models.torch_io import merge_strict
from jaxmr.sharding import batch_axes, data_sharding, param_shardings
from jaxmr.tree import param_paths

log = logging.getLogger(__name__)

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: dict  # pure nested dict of the model's nnx.Params
    opt_state: Any
    rng: jax.Array  # the run's base key (checkpointed); step k uses fold_in(rng, k), so resumes are exact


# ---------------------------------------------------------------------------------------------- optimizer


def make_optimizer(config: OptimConfig, steps: int, params: dict) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW with linear warmup + cosine decay, global-norm clipping, weight decay on matrices only, and
    parameters frozen by regex (they get exactly zero updates)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.lr, min(config.warmup_steps, max(steps - 1, 1)), max(steps, 2), config.lr * config.end_lr_fraction
    )
    decay_mask = jax.tree.map(lambda x: len(x.shape) >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask),
    )
    if config.freeze:
        paths = param_paths(params)
        for pattern in config.freeze:
            if not any(re.fullmatch(pattern, p) for p in jax.tree.leaves(paths)):
                raise ValueError(f"freeze pattern {pattern!r} matches no parameter (paths look like 'text_tower/...')")
        labels = jax.tree.map(lambda p: "frozen" if any(re.fullmatch(r, p) for r in config.freeze) else "train", paths)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


# ---------------------------------------------------------------------------------------------------- loss


def make_loss(config: LossConfig, mesh: jax.sharding.Mesh) -> Callable:
    """loss(zimg, ztxt, extras, ids) -> (loss, metrics): the configured loss, sharded when the mesh is."""
    options = {"margin": config.margin, "negatives": config.negatives} if config.name == "triplet" else {}
    if mesh.size == 1:
        fn = functools.partial(losses.LOSSES[config.name], **options)
    else:
        fn = losses.sharded_loss(config.name, mesh, axis=batch_axes(mesh), form=config.form, **options)
    if config.name == "softmax":
        return lambda zimg, ztxt, extras, ids: fn(zimg, ztxt, extras["t"], ids)
    if config.name == "sigmoid":
        return lambda zimg, ztxt, extras, ids: fn(zimg, ztxt, extras["t"], extras["b"], ids)
    return lambda zimg, ztxt, extras, ids: fn(zimg, ztxt, ids)


# ---------------------------------------------------------------------------------------------- the step


def dual_forward(model: DualEncoder, images: jax.Array, texts: jax.Array, key: jax.Array | None):
    """The end-to-end forward pass: uint8 images [B, H, W, 3], tokens [B, L] -> (zimg, ztxt, extras).

    With k captions per image, tokens [B, k, L]: each image is embedded once and its embedding repeated, so
    zimg and ztxt are both [B * k, E], row r of one matching row r of the other."""
    if texts.ndim == 2:
        return model(images, texts)
    k = texts.shape[1]
    zimg, ztxt, extras = model(images, texts.reshape(-1, texts.shape[-1]))
    return jnp.repeat(zimg, k, axis=0), ztxt, extras


def head_forward(model: DualEncoder, image_features: jax.Array, text_features: jax.Array, key: jax.Array | None):
    """LiT on cached tower features [B, Wi], [B * k, Wt]: only the projection heads run (dropout when keyed).

    With k captions per image each image's features enter the head once and its embedding comes out k times,
    each copy with its own hidden dropout, so zimg and ztxt are both [B * k, E], row r of one matching row r of
    the other."""
    ki, kt = (None, None) if key is None else jax.random.split(key)
    k = text_features.shape[0] // image_features.shape[0]
    zimg, ztxt = model.project_image(image_features, ki, repeat=k), model.project_text(text_features, kt)
    return l2_normalize(zimg), l2_normalize(ztxt), {"t": model.logit_scale, "b": model.b[...]}


def compute_grads(graphdef, loss_fn, params, batch, grad_accum: int = 1, key=None, forward=dual_forward):
    """(loss, metrics, extras, grads) for one global batch.

    `forward(model, batch["image"], batch["text"], key)` embeds; the default runs both towers end to end
    (`jaxmr.training.lit` swaps in the projection heads over cached tower features).

    With grad_accum > 1 this is GradCache: embed every micro-batch without keeping its graph, compute the
    loss on the whole batch (every negative kept), then back-propagate micro-batch by micro-batch through
    the cached embedding gradients. The gradient equals the full-batch one; activation memory is that of
    one micro-batch.
    """

    def row_ids(z):  # a forward may give k loss rows per example (k captions per image): all k are positives
        ids = batch["index"]
        return ids if z.shape[0] == ids.shape[0] else jnp.repeat(ids, z.shape[0] // ids.shape[0], axis=0)

    def embed(params, images, tokens):
        zimg, ztxt, extras = forward(nnx.merge(graphdef, params), images, tokens, key)
        return (zimg, ztxt), extras

    if grad_accum == 1:

        def loss_of(params):
            (zimg, ztxt), extras = embed(params, batch["image"], batch["text"])
            loss, metrics = loss_fn(zimg, ztxt, extras, row_ids(zimg))
            return loss, (metrics, extras)

        (loss, (metrics, extras)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        return loss, metrics, extras, grads

    def micro(x):  # [N, ...] -> [grad_accum, N / grad_accum, ...]; N is images or loss rows
        return x.reshape(grad_accum, -1, *x.shape[1:])

    images, tokens = micro(batch["image"]), micro(batch["text"])

    def embed_only(_, mb):
        return None, embed(params, *mb)[0]

    _, (zimg, ztxt) = jax.lax.scan(embed_only, None, (images, tokens))
    zimg, ztxt = zimg.reshape(-1, zimg.shape[-1]), ztxt.reshape(-1, ztxt.shape[-1])

    def scalars(params):
        model = nnx.merge(graphdef, params)
        return {"t": model.logit_scale, "b": model.b[...]}

    def loss_of(zimg, ztxt, params):
        loss, metrics = loss_fn(zimg, ztxt, scalars(params), row_ids(zimg))
        return loss, metrics

    (loss, metrics), (g_img, g_txt, grads) = jax.value_and_grad(loss_of, (0, 1, 2), has_aux=True)(zimg, ztxt, params)

    def backprop(acc, mb):
        images, tokens, g_img, g_txt = mb
        _, vjp = jax.vjp(lambda p: embed(p, images, tokens)[0], params)
        return jax.tree.map(jnp.add, acc, vjp((g_img, g_txt))[0]), None

    grads, _ = jax.lax.scan(backprop, grads, (images, tokens, micro(g_img), micro(g_txt)))
    return loss, metrics, scalars(params), grads  # no feature norms: the features were never kept


def make_train_step(graphdef, tx, schedule, loss_fn, grad_accum: int = 1, forward=dual_forward) -> Callable:
    """train_step(state, batch) -> (state, metrics): one optimizer step on one global batch."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(state.rng, state.step)  # per-step randomness (head dropout), exact on resume
        loss, metrics, extras, grads = compute_grads(graphdef, loss_fn, state.params, batch, grad_accum, key, forward)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        measurements = {
            "loss": loss,
            **{k: extras[k] for k in ("t", "b", "img/norm", "txt/norm") if k in extras},
            "lr": schedule(state.step),
            "l2_grads": optax.tree.norm(grads),
            "l2_params": optax.tree.norm(params),
            "l2_updates": optax.tree.norm(updates),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {**metrics, **measurements}

    return train_step


@dataclasses.dataclass
class Trainable:
    """Everything jitted for a config on a mesh: shapes and shardings planned once, then reused."""

    config: TrainConfig
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: Callable
    state_shardings: TrainState
    batch_sharding: NamedSharding
    init: Callable  # () -> TrainState, placed on the mesh
    step: Callable  # (state, batch) -> (state, metrics), donates state

    def abstract_state(self) -> TrainState:
        shapes = jax.eval_shape(self.init)
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings
        )


def build(config: TrainConfig, mesh: jax.sharding.Mesh) -> Trainable:
    axes = batch_axes(mesh)
    shards = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
    sizes = [("batch_size / grad_accum" if config.grad_accum > 1 else "batch_size",
              config.batch_size // config.grad_accum)]  # fmt: skip
    if config.captions_per_image > 1:  # a batch holds batch_size / k images (each embedded once), sharded like it
        sizes.append(("batch_size / captions_per_image / grad_accum",
                      config.batch_size // config.captions_per_image // config.grad_accum))  # fmt: skip
    for name, size in (*sizes, ("eval_batch_size", config.eval_batch_size)):
        if size % shards:
            raise ValueError(f"{name} = {size} does not split over the {shards} devices of the batch axes {axes}")
    graphdef, abstract_params, variables = model_graph(config.model)
    tx, schedule = make_optimizer(config.optim, config.steps, abstract_params)
    params_sharding = nnx.to_pure_dict(param_shardings(variables, mesh))
    replicated = NamedSharding(mesh, P())

    def init(loaded: dict | None = None) -> TrainState:
        """A fresh state; `loaded` ({top-level name: params}, e.g. pretrained towers) replaces those parts of the
        random initialisation inside the computation, so XLA never builds (or compiles) their random init."""
        model = DualEncoder(config.model, rngs=nnx.Rngs(config.seed))
        params = {**nnx.to_pure_dict(nnx.state(model)), **(loaded or {})}
        return TrainState(jnp.int32(0), params, tx.init(params), jax.random.key(config.seed))

    shapes = jax.eval_shape(init)
    # Optimizer moments are shaped like the parameters and sharded like them; counters are replicated.
    opt_sharding = _like_params(shapes.opt_state, abstract_params, params_sharding, replicated)
    state_shardings = TrainState(replicated, params_sharding, opt_sharding, replicated)
    batch_sharding = data_sharding(mesh, axes)
    forward = head_forward if config.cached_features else dual_forward
    step = make_train_step(graphdef, tx, schedule, make_loss(config.loss, mesh), config.grad_accum, forward)
    return Trainable(
        config=config, mesh=mesh, graphdef=graphdef, tx=tx, schedule=schedule, state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        init=jax.jit(init, out_shardings=state_shardings),
        step=jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
    )  # fmt: skip


def _like_params(opt_shapes, params, params_sharding, replicated):
    """Shardings for an optimizer state: subtrees shaped like the params get the params' shardings."""
    param_struct = jax.tree.structure(params)

    def visit(node):
        if jax.tree.structure(node) == param_struct:
            return params_sharding
        return None

    return jax.tree.map(
        lambda node: visit(node) or jax.tree.map(lambda _: replicated, node),
        opt_shapes,
        is_leaf=lambda node: jax.tree.structure(node) == param_struct or not jax.tree.leaves(node),
    )


def init_state(trainable: Trainable) -> TrainState:
    """A fresh state: random initialisation, with the pretrained towers the model config names (loaded on the
    host, checked strictly against the model, and placed with the parameters' shardings) in place of theirs."""
    config = trainable.config
    if not config.init_from and not has_pretrained_towers(config.model):
        return trainable.init()
    abstract = model_graph(config.model)[1]  # shapes and dtypes only (traced once per config; no init traced)
    if config.init_from:
        exported, params, _, _ = load_export(config.init_from)
        if exported.model != config.model:
            raise ValueError(f"init_from {config.init_from}: its model config differs from this run's model config")
        loaded, names = merge_strict(abstract, params, config.init_from), [f"every parameter (from {config.init_from})"]
    else:
        params, names = load_pretrained_towers(config.model, abstract)
        loaded = {name: params[name] for name in names}
    log.info("loaded pretrained weights into %s", ", ".join(names))
    shardings = trainable.state_shardings.params
    return trainable.init(jax.device_put(loaded, {name: shardings[name] for name in loaded}))
