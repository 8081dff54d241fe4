"""Training: the state, the optimizer, one jitted `train_step` (with GradCache), evaluation, checkpoints.

`train/main.py` and `jaxmr train` are thin layers over `train(config, workdir)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmr import distributed, losses
from jaxmr.config import (
    DataConfig,
    LossConfig,
    OptimConfig,
    TrainConfig,
    claim_workdir,
    from_dict,
    load_config,
)
from jaxmr.data import (
    DataError,
    EvalStats,
    PipelineConfig,
    Source,
    caption_table,
    eval_caption_batches,
    eval_image_batches,
    parse_source,
    train_iterator,
)
from jaxmr.data.pipeline import data_sharding
from jaxmr.eval import retrieval_metrics
from jaxmr.models import DualEncoder, ModelConfig, l2_normalize
from jaxmr.sharding import LOGICAL_RULES, make_mesh, param_shardings
from jaxmr.text import Tokenizer, load_tokenizer, minilm_wordpiece, train_bpe

log = logging.getLogger(__name__)
Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: dict  # pure nested dict of the model's nnx.Params
    opt_state: Any
    rng: jax.Array  # the run's base key (checkpointed); step k uses fold_in(rng, k), so resumes are exact


# ------------------------------------------------------------------------------------------ model and mesh


def batch_axes(mesh: jax.sharding.Mesh) -> str | tuple[str, ...]:
    """The mesh axes the batch is split over: what the rules table maps "batch" to, as far as the mesh has it
    (size-1 axes included: shard_map and the data sharding name them either way)."""
    target = dict(LOGICAL_RULES)["batch"]
    axes = tuple(a for a in ((target,) if isinstance(target, str) else target or ()) if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"the mesh needs a 'data' or 'fsdp' axis, has {mesh.axis_names}")
    return axes[0] if len(axes) == 1 else axes


def model_graph(config: ModelConfig) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, abstract params as a pure dict of ShapeDtypeStructs, their Variables for sharding rules)."""
    abstract = nnx.eval_shape(lambda: DualEncoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx.to_pure_dict(state), state


def param_paths(params: dict) -> dict:
    """The same tree with each leaf replaced by its path string, e.g. 'image_tower/encoder/blocks/0/mlp/fc1/kernel'."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "/".join(str(getattr(k, "key", k)) for k in path), params)


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
    """LiT on cached tower features [B, Wi], [B, Wt]: only the projection heads run (dropout when keyed)."""
    ki, kt = (None, None) if key is None else jax.random.split(key)
    zimg, ztxt = model.project_image(image_features, ki), model.project_text(text_features, kt)
    return l2_normalize(zimg), l2_normalize(ztxt), {"t": model.logit_scale, "b": model.b[...]}


def compute_grads(graphdef, loss_fn, params, batch, grad_accum: int = 1, key=None, forward=dual_forward):
    """(loss, metrics, extras, grads) for one global batch.

    `forward(model, batch["image"], batch["text"], key)` embeds; the default runs both towers end to end
    (`jaxmr.lit` swaps in the projection heads over cached tower features).

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
    for name, size in (
        ("batch_size", config.batch_size // config.grad_accum),
        ("eval_batch_size", config.eval_batch_size),
    ):
        if size % shards:
            what = "batch_size / grad_accum" if name == "batch_size" and config.grad_accum > 1 else name
            raise ValueError(f"{what} = {size} does not split over the {shards} devices of the batch axes {axes}")
    graphdef, abstract_params, variables = model_graph(config.model)
    tx, schedule = make_optimizer(config.optim, config.steps, abstract_params)
    params_sharding = nnx.to_pure_dict(param_shardings(variables, mesh))
    replicated = NamedSharding(mesh, P())

    def init() -> TrainState:
        model = DualEncoder(config.model, rngs=nnx.Rngs(config.seed))
        params = nnx.to_pure_dict(nnx.state(model))
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
    """A fresh state: random initialisation, then the pretrained towers the model config names (loaded on the
    host, checked strictly against the model, and placed with the parameters' shardings)."""
    from jaxmr.models.pretrained import has_pretrained_towers, load_pretrained_towers, merge_strict

    state = trainable.init()
    config = trainable.config
    if not config.init_from and not has_pretrained_towers(config.model):
        return state  # nothing to load: the parameters stay where init placed them
    if config.init_from:
        from jaxmr.export import read_export_meta, unflatten

        meta = read_export_meta(config.init_from)
        if from_dict(meta["config"]).model != config.model:
            raise ValueError(f"init_from {config.init_from}: its model config differs from this run's model config")
        with np.load(Path(config.init_from) / "params.npz") as f:
            params = merge_strict(jax.device_get(state.params), unflatten(dict(f)), config.init_from)
        loaded = [f"every parameter (from {config.init_from})"]
    else:
        params, loaded = load_pretrained_towers(config.model, jax.device_get(state.params))
    log.info("loaded pretrained weights into %s", ", ".join(loaded))
    return state.replace(params=jax.device_put(params, trainable.state_shardings.params))


# ----------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(config: DataConfig, source: Source, workdir: Path, init_from: str = "") -> Tokenizer:
    """The run's tokenizer: loaded from the workdir when it is there, else made and saved there (in a
    multi-process run process 0 makes it and the others load it)."""
    path = workdir / "tokenizer"
    if not distributed.is_primary():
        distributed.barrier("tokenizer")
        return load_tokenizer(path)
    tokenizer = _make_tokenizer(config, source, path, init_from)
    distributed.barrier("tokenizer")
    return tokenizer


def _make_tokenizer(config: DataConfig, source: Source, path: Path, init_from: str) -> Tokenizer:
    if (path / "tokenizer_meta.json").exists():
        return load_tokenizer(path)
    if init_from:  # an imported or exported model brings its own tokenizer
        tokenizer = load_tokenizer(Path(init_from) / "tokenizer")
    elif config.tokenizer == "wordpiece":
        tokenizer = minilm_wordpiece(config.max_len)
    elif config.tokenizer == "bpe":
        texts, _ = caption_table(source)
        if not texts:
            raise DataError(f"{source.name}: no captions to learn a tokenizer from")
        tokenizer = train_bpe(texts, vocab_size=config.vocab_size, max_len=config.max_len)
    else:
        raise ValueError(f"data.tokenizer must be bpe or wordpiece (imported models bring theirs through "
                         f"init_from), got {config.tokenizer!r}")  # fmt: skip
    tokenizer.save(path)
    return tokenizer


def check_compatible(config: TrainConfig, tokenizer: Tokenizer) -> None:
    text = config.model.text
    if tokenizer.vocab_size > text.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size is {text.vocab_size}"
        )
    if tokenizer.max_len > text.max_len:
        raise ValueError(f"data.max_len {tokenizer.max_len} exceeds model.text.max_len {text.max_len}")
    image = config.model.image
    if image.image_size != config.data.image_size:
        raise ValueError(f"data.image_size {config.data.image_size} != model image_size {image.image_size}")


# ---------------------------------------------------------------------------------------------- evaluation


class Evaluator:
    """Recall@K both ways on a captioned split, with every caption of every image (big_vision style: pure
    metrics in `jaxmr.eval`, this class only embeds).

    `image_fn` / `text_fn` name the DualEncoder methods that embed ("image_tower_features" / "text_tower" give
    the towers' raw features, which is how LiT caches them)."""

    def __init__(self, source: Source, tokenizer: Tokenizer, trainable: Trainable, batch_size: int,
                 image_fn: str = "encode_image", text_fn: str = "encode_text"):  # fmt: skip
        self.source, self.tokenizer, self.batch_size = source, tokenizer, batch_size
        self.sharding = trainable.batch_sharding
        self.image_size = trainable.config.data.image_size
        self.trim_padding = trainable.config.model.text.padding_is_inert
        graphdef, replicated = trainable.graphdef, NamedSharding(trainable.mesh, P())
        in_shardings = (trainable.state_shardings.params, self.sharding)
        self.encode_image = jax.jit(lambda p, x: getattr(nnx.merge(graphdef, p), image_fn)(x),
                                    in_shardings=in_shardings, out_shardings=replicated)  # fmt: skip
        self.encode_text = jax.jit(lambda p, x: getattr(nnx.merge(graphdef, p), text_fn)(x),
                                   in_shardings=in_shardings, out_shardings=replicated)  # fmt: skip
        self.texts, self.owners = caption_table(source)
        if not self.texts:
            raise DataError(f"{source.name}: evaluation needs captions")

    def embed_images(
        self, params: dict, progress: bool = False, stats: EvalStats | None = None, view: int = 0,
        crop_scale: tuple[float, float] = (1.0, 1.0), seed: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """(zimg [N, E], valid bool [N]) for every image, plain (view 0) or an augmented view."""
        from tqdm import tqdm

        chunks, valid = [], np.zeros(len(self.source), bool)
        images = eval_image_batches(self.source, self.image_size, self.batch_size, stats=stats, view=view,
                                    crop_scale=crop_scale, seed=seed)  # fmt: skip
        total = -(-len(self.source) // self.batch_size)
        label = "images" if view == 0 else f"image view {view}"
        for batch in tqdm(images, total=total, desc=label, unit="batch", disable=not progress, leave=False):
            z = np.asarray(self.encode_image(params, jax.device_put(batch["image"], self.sharding)))
            chunks.append((batch["index"][batch["mask"]], z[batch["mask"]]))
            valid[batch["index"][batch["mask"]]] = True
        dim = chunks[0][1].shape[1] if chunks else 0
        zimg = np.zeros((len(self.source), dim), np.float32)
        for index, z in chunks:
            zimg[index] = z
        return zimg, valid

    def embed(self, params: dict, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, EvalStats]:
        """(zimg [N, E], ztxt [C, E], valid bool [N], stats)."""
        from tqdm import tqdm

        stats = EvalStats()
        zimg, valid = self.embed_images(params, progress=progress, stats=stats)
        # Captions shortest first, each batch cut to its longest caption (rounded up to 16 tokens) where the text
        # tower ignores padding: the features are the same and short captions cost less.
        order = np.argsort([len(t) for t in self.texts], kind="stable")
        batches = eval_caption_batches([self.texts[i] for i in order], self.owners[order], self.tokenizer,
                                       self.batch_size, stats=stats)  # fmt: skip
        total = -(-len(self.texts) // self.batch_size)
        ztxt = []
        for batch in tqdm(batches, total=total, desc="captions", unit="batch", disable=not progress, leave=False):
            tokens = batch["text"]
            if self.trim_padding:
                longest = int((tokens != self.tokenizer.pad_id).sum(1).max())
                tokens = tokens[:, : min(-(-longest // 16) * 16, tokens.shape[1])]
            z = np.asarray(self.encode_text(params, jax.device_put(tokens, self.sharding)))
            ztxt.append(z[batch["mask"]])
        ztxt = np.concatenate(ztxt)[np.argsort(order)]
        return zimg, ztxt, valid, stats

    def __call__(self, params: dict) -> dict[str, float]:
        zimg, ztxt, valid, stats = self.embed(params)
        keep = valid[self.owners]  # captions of unreadable images cannot be scored
        new_index = np.cumsum(valid) - 1
        metrics = retrieval_metrics(zimg[valid], ztxt[keep], new_index[self.owners[keep]])
        metrics["unreadable_images"] = len(stats.unreadable_images)
        return metrics


# --------------------------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """orbax CheckpointManager: async saves, the latest K kept plus the best by `best_metric`; each
    checkpoint holds the train state (params, optimizer, RNG, step) and the data iterator's state."""

    def __init__(self, directory: Path, keep: int, best_metric: str):
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                                          keep_checkpoints_without_metrics=False),
        ])  # fmt: skip
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict, metrics: dict | None = None) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        step = self.manager.latest_step() if step is None else step
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# ------------------------------------------------------------------------------------------------ metrics


class MetricsWriter:
    """Metrics as JSON lines (workdir/metrics.jsonl) and TensorBoard events (workdir/tensorboard); only process
    0 of a multi-process run writes (`enabled`)."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.path, self.enabled, self.tb = workdir / "metrics.jsonl", enabled, None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency; be tolerant anyway
            self.tb = None

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        values = {f"{prefix}{k}": float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---------------------------------------------------------------------------------------------------- loop


class _Stop:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step boundary and returns."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no signal handling
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("signal %d: saving a checkpoint and stopping", signum)
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, workdir: str | Path, stop_at_step: int | None = None, progress: bool = True) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the last evaluation's metrics (empty if none ran)."""
    from tqdm import tqdm

    workdir = claim_workdir(config, workdir, write=distributed.is_primary())
    mesh = make_mesh(config.mesh)
    source = parse_source(config.data.source, config.data.train_split)
    tokenizer = build_tokenizer(config.data, source, workdir, config.init_from)
    check_compatible(config, tokenizer)
    trainable = build(config, mesh)
    checkpoints = Checkpoints(workdir / "checkpoints", config.keep_checkpoints, config.best_metric)
    if checkpoints.latest_step() is not None:
        state, data_state = checkpoints.restore(trainable.abstract_state())
        log.info("resumed from step %d", int(state.step))
    else:
        state, data_state = init_state(trainable), None
    if config.cached_features:
        from jaxmr.lit import cached_training

        iterator, evaluator = cached_training(config, trainable, state.params, tokenizer, workdir, progress)
    else:
        pipeline = PipelineConfig(
            batch_size=config.batch_size // config.captions_per_image, image_size=config.data.image_size,
            seed=config.seed, crop_scale=config.data.crop_scale, num_workers=config.data.num_workers,
            shuffle_group=config.data.shuffle_group, read_threads=config.data.read_threads,
            captions_per_image=config.captions_per_image,
        )  # fmt: skip
        iterator = train_iterator(source, tokenizer, pipeline, mesh=mesh, data_axes=batch_axes(mesh))
        evaluator = Evaluator(parse_source(config.data.source, config.data.eval_split), tokenizer, trainable,
                              config.eval_batch_size)  # fmt: skip
    if data_state is not None:
        iterator.set_state(data_state)
    writer = MetricsWriter(workdir, enabled=distributed.is_primary())
    start = int(state.step)
    last_eval: dict = {}
    end = min(config.steps, stop_at_step or config.steps)
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not progress or not distributed.is_primary())  # fmt: skip
    try:
        with jax.set_mesh(mesh), _Stop() as stop:
            timer, seen = time.perf_counter(), 0
            for step in range(start + 1, end + 1):
                batch = next(iterator)
                state, metrics = trainable.step(state, batch)
                seen += config.batch_size
                final = step == end
                if step % config.log_every == 0 or final:
                    metrics = jax.device_get(metrics)
                    elapsed = time.perf_counter() - timer
                    metrics["examples_per_s"] = seen / elapsed
                    metrics["skipped_images"] = iterator.stats["skipped_images"]
                    writer.write(step, metrics, "train/")
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", ex_s=f"{metrics['examples_per_s']:.0f}")
                    timer, seen = time.perf_counter(), 0
                eval_metrics = None
                if step % config.eval_every == 0 or step == config.steps:
                    eval_metrics = last_eval = evaluator(state.params)
                    writer.write(step, eval_metrics, "eval/")
                    log.info("step %d: %s", step, _summary(eval_metrics))
                    timer, seen = time.perf_counter(), 0
                stopping = distributed.any_process(stop.requested)  # a signal to one process stops them all
                if step % config.checkpoint_every == 0 or final or stopping:
                    checkpoints.save(step, state, iterator.get_state(), eval_metrics)
                bar.update(1)
                if stopping:
                    break
    finally:
        bar.close()
        checkpoints.wait()
        checkpoints.close()
        writer.close()
        iterator.close()
    return last_eval


def _summary(metrics: dict) -> str:
    keys = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)


# -------------------------------------------------------------------------------------------- evaluation


def load_run(workdir: str | Path, step: int | None = None) -> tuple[TrainConfig, Trainable, TrainState, Tokenizer]:
    """A finished (or interrupted) run: its config, jitted functions, restored state and tokenizer."""
    workdir = Path(workdir)
    if not (workdir / "config.json").exists():
        raise ValueError(f"{workdir} is not a training run (no config.json)")
    config = load_config(workdir / "config.json")
    trainable = build(config, make_mesh(config.mesh))
    checkpoints = Checkpoints(workdir / "checkpoints", config.keep_checkpoints, config.best_metric)
    if checkpoints.latest_step() is None:
        raise ValueError(f"{workdir} has no checkpoint yet")
    state, _ = checkpoints.restore(trainable.abstract_state(), step)
    checkpoints.close()
    return config, trainable, state, load_tokenizer(workdir / "tokenizer")


def evaluate(workdir: str | Path, source_spec: str | None = None, split: str | None = None) -> dict[str, float]:
    """Recall@K of a run's latest checkpoint on its own eval split or on any source and split."""
    config, trainable, state, tokenizer = load_run(workdir)
    source = parse_source(source_spec or config.data.source, split or config.data.eval_split)
    with jax.set_mesh(trainable.mesh):
        return Evaluator(source, tokenizer, trainable, config.eval_batch_size)(state.params)
