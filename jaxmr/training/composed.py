"""Composed queries: a reference image plus a modification sentence retrieves the edited image.

    jaxmr train --config configs/shapes_composed.py --workdir runs/shapes_composed
    jaxmr eval --workdir runs/shapes_composed --split test

Training sits on a trained dual encoder (`ComposedConfig.base`). Its image tower is frozen, so every gallery
image of a split is embedded once and cached (`WORKDIR/features/`); a `Composer` (a copy of the base text tower
and projection, plus TIRG fusion) learns to map (reference embedding, modification tokens) to the target's
embedding with the configured contrastive loss, sharded over the mesh like the dual encoder's. The run ends
with an export in `WORKDIR/model/`: the base model plus `composer/`, which `jaxmr index build`, `Encoder` and
the server use for composed queries.

Evaluation ranks the split's whole gallery (its own reference left out) for three queries in one table: the
trained composer, the reference image alone, and the normalised sum of the reference image and the text
embedded by the base model (what the server does without a composer)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from jaxmr.config import ComposedConfig, claim_workdir, from_dict, read_config_json, to_dict
from jaxmr.data.triplets import TripletSource, parse_triplets, triplet_rows
from jaxmr.encoder import Encoder
from jaxmr.evaluators import QUERIES, Composed, Gallery, embed_images
from jaxmr.export import COMPOSER_DIR, fingerprint, is_export, load_composer, read_export_meta
from jaxmr.files import atomic_dir, save_npy, slug
from jaxmr.models import Composer
from jaxmr.sharding import batch_axes, make_mesh
from jaxmr.training.checkpoints import MetricsWriter, StepTimer
from jaxmr.training.runs import export_run, load_encoder
from jaxmr.training.step import TrainState, make_loss, make_optimizer, make_train_step
from jaxmr.tree import flatten, unflatten

log = logging.getLogger(__name__)


def is_composed_run(workdir: str | Path) -> bool:
    path = Path(workdir) / "config.json"
    return path.is_file() and json.loads(path.read_text()).get("__type__") == "ComposedConfig"


@dataclasses.dataclass
class TripletSplit:
    """One split, embedded: gallery [G, E]; references, targets int [N] gallery rows; texts; tokens int [N, L]."""

    gallery: np.ndarray
    references: np.ndarray
    targets: np.ndarray
    texts: list[str]
    tokens: np.ndarray

    @property
    def rows(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        return self.references, self.targets, self.texts


def embed_split(source: TripletSource, encoder: Encoder, cache: Path | None, progress: bool = False,
                batch: int = 256) -> TripletSplit:  # fmt: skip
    """Embeds a split's gallery with the base image encoder (cached under `cache`, keyed by model and source)."""
    references, targets, texts = triplet_rows(source)
    key = (
        f"{encoder.fingerprint}-{slug(source.name, keep='=-.')}-{getattr(source, 'split', '')}-{source.gallery_size()}"
    )
    path = cache / f"gallery-{key}.npy" if cache is not None else None
    if path is not None and path.exists():
        gallery = np.load(path)
    else:
        gallery, _ = embed_images(encoder, Gallery(source), batch, progress, strict=True)
        if path is not None:
            save_npy(path, gallery)
    return TripletSplit(gallery, references, targets, texts, encoder.tokenizer.encode(texts))


# ------------------------------------------------------------------------------------------- the model


def init_composer(config: ComposedConfig, encoder: Encoder) -> tuple[nnx.GraphDef, dict]:
    """A Composer whose text tower and projection start as the base model's (pure params dict)."""
    composer = Composer(encoder.config.model, config.hidden, rngs=nnx.Rngs(config.seed))
    graphdef, state = nnx.split(composer)
    params = nnx.to_pure_dict(state)
    base = jax.device_get(encoder.params)
    for part in ("text_tower", "text_proj"):
        params[part] = jax.tree.map(np.asarray, base[part])
    return graphdef, params


def composed_forward(model: Composer, ztarget: jax.Array, query: dict, key: jax.Array | None):
    """(target embeddings as the 'image' side, composed queries as the 'text' side, loss scalars)."""
    return ztarget, model(query["reference"], query["tokens"]), {"t": model.logit_scale, "b": model.b[...]}


def compose_batched(graphdef: nnx.GraphDef, params: dict, zref: np.ndarray, tokens: np.ndarray,
                    batch: int = 1024) -> np.ndarray:  # fmt: skip
    """Composed queries for many rows, `batch` at a time (the last batch padded, so one shape compiles)."""
    fn = jax.jit(lambda p, z, t: nnx.merge(graphdef, p)(z, t))
    out = np.zeros_like(zref, dtype=np.float32)
    for start in range(0, len(zref), batch):
        z, t = zref[start : start + batch], tokens[start : start + batch]
        pad = batch - len(z)
        z = np.concatenate([z, np.zeros((pad, z.shape[1]), z.dtype)])
        t = np.concatenate([t, np.zeros((pad, t.shape[1]), t.dtype)])
        out[start : start + batch] = np.asarray(fn(params, z, t))[: batch - pad]
    return out


class CachedGallery:
    """The base encoder as an `Embedder` for one embedded split: its cached gallery, the base text encoder, and
    the composer's parameters (None: no composer yet, only the baselines)."""

    def __init__(self, data: TripletSplit, encoder: Encoder, graphdef: nnx.GraphDef | None = None,
                 params: dict | None = None):  # fmt: skip
        self.data, self.encoder, self.graphdef, self.params = data, encoder, graphdef, params

    def embed_images(self, images, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if len(images) != len(self.data.gallery):
            raise ValueError(f"{images.name}: {len(images)} images, the cached gallery has {len(self.data.gallery)}")
        return self.data.gallery, np.ones(len(self.data.gallery), bool)

    def embed_texts(self, texts, progress: bool = False) -> np.ndarray:
        return self.encoder.encode_texts(texts)

    def compose(self, zref: np.ndarray, texts) -> np.ndarray | None:
        if self.params is None:
            return None
        return compose_batched(self.graphdef, self.params, zref, self.encoder.tokenizer.encode(list(texts)))


# ------------------------------------------------------------------------------------------- training


def train(config: ComposedConfig, workdir: str | Path, progress: bool = True) -> dict[str, float]:
    """Trains the composer of `config` in `workdir` (from scratch: minutes; the gallery embeddings are reused)
    and writes the export `workdir/model`. Returns the last evaluation."""
    workdir = claim_workdir(config, workdir)
    encoder = load_encoder(config.base)
    train_data = embed_split(parse_triplets(config.data, config.train_split), encoder, workdir / "features", progress)
    val_triplets = parse_triplets(config.data, config.eval_split)
    val_data = embed_split(val_triplets, encoder, workdir / "features", progress)
    evaluator = Composed(val_triplets, val_data.rows)
    mesh = make_mesh(config.mesh)
    axes = batch_axes(mesh)
    shards = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
    if config.batch_size % shards:
        raise ValueError(f"batch_size {config.batch_size} does not split over {shards} devices")
    if config.batch_size > len(train_data.texts):
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(train_data.texts)} training triplets")
    graphdef, params = init_composer(config, encoder)
    optim = config.optim
    if not config.train_text:
        optim = dataclasses.replace(optim, freeze=(*optim.freeze, "text_tower/.*", "text_proj/.*"))
    tx, schedule = make_optimizer(optim, config.steps, params)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(axes))
    step_fn = make_train_step(graphdef, tx, schedule, make_loss(config.loss, mesh), 1, composed_forward)
    step_fn = jax.jit(step_fn, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                      donate_argnums=(0,))  # fmt: skip
    state = TrainState(jnp.int32(0), params, tx.init(params), jax.random.key(config.seed))
    state = jax.device_put(state, replicated)
    writer = MetricsWriter(workdir)
    rng = np.random.default_rng(config.seed)
    order, cursor = rng.permutation(len(train_data.texts)), 0
    last: dict[str, float] = {}
    bar = tqdm(total=config.steps, desc="train composer", unit="step", disable=not progress, dynamic_ncols=True)
    timer = StepTimer()
    with jax.set_mesh(mesh):
        for step in range(1, config.steps + 1):
            with timer.data_wait():
                if cursor + config.batch_size > len(order):
                    order, cursor = rng.permutation(len(train_data.texts)), 0
                rows = order[cursor : cursor + config.batch_size]
                cursor += config.batch_size
                batch = {
                    "image": train_data.gallery[train_data.targets[rows]],
                    "text": {"reference": train_data.gallery[train_data.references[rows]],
                             "tokens": train_data.tokens[rows]},
                    "index": train_data.targets[rows].astype(np.int32),
                }  # fmt: skip
                batch = jax.device_put(batch, sharded)
            state, metrics = step_fn(state, batch)
            timer.steps += 1
            if step % config.log_every == 0 or step == config.steps:
                metrics = {**jax.device_get(metrics), **timer.report(config.batch_size)}
                writer.write(step, metrics, "train/")
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                timer = StepTimer()
            if step % config.eval_every == 0 or step == config.steps:
                params = jax.device_get(state.params)
                last = evaluator(CachedGallery(val_data, encoder, graphdef, params))
                writer.write(step, last, "eval/")
                log.info("step %d: composed R@1 %.3f (image only %.3f, image + text %.3f)", step,
                         last["composed_r1"], last["image_only_r1"], last["image_plus_text_r1"])  # fmt: skip
                timer = StepTimer()
            bar.update(1)
    bar.close()
    writer.close()
    params = jax.device_get(state.params)
    np.savez(workdir / "composer.npz", **flatten(params))
    export_composed(workdir, workdir / "model")
    return last


# ------------------------------------------------------------------------------------------- export and eval


def export_composed(workdir: str | Path, out: str | Path) -> str:
    """The base model's export plus `composer/` (params.npz, config.json); returns the base fingerprint."""
    workdir, out = Path(workdir), Path(out)
    config = read_config_json(workdir / "config.json")
    with np.load(workdir / "composer.npz") as f:
        params = unflatten(dict(f))
    base = Path(config.base)
    with atomic_dir(out) as tmp:  # like every export: `out` is the old one or the whole new one
        if is_export(base):
            shutil.copytree(base, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(COMPOSER_DIR))
        else:
            export_run(base, tmp)
        meta = read_export_meta(tmp)
        model_config = from_dict(meta["config"]).model
        target = tmp / COMPOSER_DIR
        target.mkdir(exist_ok=True)
        np.savez(target / "params.npz", **flatten(params))
        composer_meta = {
            "hidden": config.hidden,
            "base_fingerprint": meta["fingerprint"],
            "fingerprint": fingerprint(params, from_dict(meta["config"])),
            "workdir": str(workdir.resolve()),
            "config": to_dict(config),
        }
        (target / "config.json").write_text(json.dumps(composer_meta, indent=2) + "\n")
        load_composer(tmp, model_config)  # the written composer matches the base model's config
    return meta["fingerprint"]


def evaluate(workdir: str | Path, source_spec: str | None = None, split: str | None = None) -> dict[str, float]:
    """The three queries' recall on a split of the run's triplet source (or another)."""
    workdir = Path(workdir)
    config = read_config_json(workdir / "config.json")
    export = workdir / "model"
    if not (export / COMPOSER_DIR).is_dir():
        raise ValueError(f"{workdir} has no trained composer yet (no {export / COMPOSER_DIR})")
    encoder = Encoder.load(export)
    graphdef, params = load_composer(export, encoder.config.model)
    triplets = parse_triplets(source_spec or config.data, split or config.eval_split)
    data = embed_split(triplets, encoder, workdir / "features")
    return Composed(triplets, data.rows)(CachedGallery(data, encoder, graphdef, params))


def print_table(metrics: dict[str, float]) -> None:
    print(f"{'query':<18} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'median rank':>12}")
    for name in QUERIES:
        if f"{name}_r1" in metrics:
            row = [metrics[f"{name}_{k}"] for k in ("r1", "r5", "r10")]
            print(f"{name:<18} " + " ".join(f"{v:>7.3f}" for v in row) + f" {metrics[f'{name}_median_rank']:>12.0f}")
    print(f"({int(metrics['n_queries'])} queries, gallery of {int(metrics['n_gallery'])} images)")
