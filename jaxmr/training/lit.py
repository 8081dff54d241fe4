"""LiT on frozen towers: the towers' features are computed once and cached, then only the heads train.

With both towers frozen (`optim.freeze` covers every tower parameter), each epoch of end-to-end training would
recompute the same EfficientNet and BERT features; on a CPU that is hours. `cached_features=True` embeds every
image and caption of the train and eval splits once (`workdir/features/`, one file per tower and split, keyed by
that tower, the data and the preprocessing: a run that swaps one tower reuses the other's), then trains the
projection heads and the temperature on batches drawn from those arrays. The checkpoints hold the whole model, so
`jaxmr eval`, `jaxmr index build` and `jaxmr serve` use the run like any other.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxmr.config import TrainConfig, to_dict
from jaxmr.data import DataError, Source, caption_table, parse_source
from jaxmr.files import save_npz, slug
from jaxmr.models import l2_normalize
from jaxmr.sharding import to_global
from jaxmr.text import Tokenizer
from jaxmr.training.evaluators import TrainEmbedder
from jaxmr.tree import param_paths

log = logging.getLogger(__name__)
TOWERS = ("image_tower", "text_tower")


@dataclasses.dataclass
class Features:
    """The towers' outputs for one split: image [N, Wi] float32 (or [V, N, Wi]: V views, the plain resize first,
    then augmented ones), valid bool [N] (readable), text [C, Wt] float32, owners int32 [C] (each caption's image).
    """

    image: np.ndarray
    valid: np.ndarray
    text: np.ndarray
    owners: np.ndarray


def check_towers_frozen(config: TrainConfig, paths: list[str]) -> None:
    """Cached features are only right if no tower parameter ever changes: every tower path must be frozen."""
    loose = [p for p in paths if p.split("/")[0] in TOWERS and not any(re.fullmatch(r, p) for r in config.optim.freeze)]
    if loose:
        raise ValueError(
            f"cached_features needs frozen towers, but {len(loose)} tower parameters train (e.g. {loose[0]}); "
            "freeze them (optim.freeze) or set cached_features=False to fine-tune end to end"
        )


def cache_keys(config: TrainConfig, spec: str, split: str, tokenizer: Tokenizer) -> dict[str, str]:
    """What each tower's cached features depend on, as a short hash per tower ("image", "text"): the tower, the
    compute dtype, the data, and the pixel normalisation and size (images) or the tokenizer (captions)."""
    m, d = config.model, config.data
    common = {"dtype": m.dtype, "source": spec, "split": split}
    what = {
        "image": {"image": to_dict(m.image), "pixel": [m.pixel_mean, m.pixel_std], "image_size": d.image_size},
        "text": {"text": to_dict(m.text), "tokenizer": [tokenizer.kind, tokenizer.max_len]},
    }
    return {k: hashlib.sha1(json.dumps({**common, **v}, sort_keys=True).encode()).hexdigest()[:16]
            for k, v in what.items()}  # fmt: skip


def tower_features(trainable, params: dict, source: Source, tokenizer: Tokenizer, paths: dict[str, Path],
                   progress: bool = True) -> Features:  # fmt: skip
    """The towers' features for every image and caption of `source`, each tower's computed once and kept at
    `paths["image"]` / `paths["text"]`."""
    towers = None
    if not paths["image"].exists():
        log.info("computing image tower features for %s (once; cached in %s)", source.name, paths["image"])
        towers = _towers(trainable, tokenizer, params)
        with jax.set_mesh(trainable.mesh):
            image, valid = towers.embed_images(source, progress)
        save_npz(paths["image"], image=image.astype(np.float32), valid=valid)
    if not paths["text"].exists():
        texts, owners = caption_table(source)
        if not texts:
            raise DataError(f"{source.name}: LiT needs captions")
        log.info("computing text tower features for %s (once; cached in %s)", source.name, paths["text"])
        towers = towers or _towers(trainable, tokenizer, params)
        with jax.set_mesh(trainable.mesh):
            text = towers.embed_texts(texts, progress)
        save_npz(paths["text"], text=text.astype(np.float32), owners=owners)
    with np.load(paths["image"]) as i, np.load(paths["text"]) as t:
        return Features(i["image"], i["valid"], t["text"], t["owners"])


def augmented_views(trainable, params: dict, source: Source, tokenizer: Tokenizer, path: Path, views: int,
                    crop_scale: tuple[float, float], seed: int, progress: bool = True) -> list[np.ndarray]:  # fmt: skip
    """Image tower features of `views - 1` augmented views of every image (random resized crop + flip), each
    cached at `path` with the view number in its name: [N, Wi] each."""
    towers = None
    out = []
    for view in range(1, views):
        view_path = path.with_name(f"{path.stem}-view{view}.npz")
        if not view_path.exists():
            towers = towers or _towers(trainable, tokenizer, params)
            with jax.set_mesh(trainable.mesh):
                image, _ = towers.embed_images(source, progress, view=view, crop_scale=crop_scale, seed=seed)
            save_npz(view_path, image=image.astype(np.float32))
        with np.load(view_path) as f:
            out.append(f["image"])
    return out


def _towers(trainable, tokenizer: Tokenizer, params: dict) -> TrainEmbedder:
    """An embedder whose embeddings are the towers' raw features (what LiT caches)."""
    return TrainEmbedder(trainable, tokenizer, params, image_fn="image_tower_features", text_fn="text_tower")


class FeatureBatches:
    """Training batches drawn from cached features, deterministic in the step number (so resuming is exact).

    Each epoch visits the readable, captioned images in a fresh order; a batch holds batch_size / k images and
    k of each image's captions (distinct when it has k), with `index` naming the image so that all k are
    positives. Yields {"image": [B / k, Wi], "text": [B, Wt], "index": int32 [B]} placed on the mesh: each
    image's features once (its head runs once, `step.head_forward`), its k captions in a row.
    """

    def __init__(self, features: Features, batch_size: int, captions_per_image: int, seed: int, sharding):
        self.features, self.k, self.seed, self.sharding = features, captions_per_image, seed, sharding
        self.per_batch = batch_size // captions_per_image
        by_image: dict[int, list[int]] = {}
        for caption, owner in enumerate(features.owners):
            if features.valid[owner]:
                by_image.setdefault(int(owner), []).append(caption)
        self.images = np.asarray(sorted(by_image), np.int64)
        if len(self.images) < self.per_batch:
            raise DataError(f"{len(self.images)} captioned images cannot fill a batch of {self.per_batch} images")
        self.captions = [by_image[i] for i in self.images]
        self.step = 0
        self.stats = {"skipped_images": int((~features.valid).sum())}

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        per_epoch = len(self.images) // self.per_batch  # the last partial batch of an epoch is dropped
        epoch, position = divmod(step, per_epoch)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.images))[position * self.per_batch : (position + 1) * self.per_batch]
        rng = np.random.default_rng([self.seed, epoch, position, 1])
        texts, ids = [], []
        for slot in order:
            captions = self.captions[slot]
            texts.extend(rng.choice(captions, self.k, replace=len(captions) < self.k))
            ids.extend([slot] * self.k)
        f = self.features
        rows = self.images[order]
        if f.image.ndim == 3:  # one view per image, drawn anew each step
            rows = (rng.integers(0, f.image.shape[0], len(order)), rows)
        return {
            "image": f.image[rows],
            "text": f.text[np.asarray(texts)],
            "index": np.asarray(ids, np.int32),
        }

    def __next__(self) -> dict[str, jax.Array]:
        batch = self.batch_at(self.step)
        self.step += 1
        return to_global(batch, self.sharding)

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def close(self) -> None:
        pass


class FeatureEmbedder:
    """The heads on one split's cached tower features, as an `Embedder` for that split's evaluators: the same
    metrics `jaxmr eval` computes end to end, without running the towers."""

    def __init__(self, features: Features, trainable, params: dict | None = None):
        self.features, self.params = features, params
        graphdef = trainable.graphdef
        self.project_image = jax.jit(lambda p, x: l2_normalize(nnx.merge(graphdef, p).project_image(x)))
        self.project_text = jax.jit(lambda p, x: l2_normalize(nnx.merge(graphdef, p).project_text(x)))

    def with_params(self, params: dict) -> FeatureEmbedder:
        clone = copy.copy(self)  # the compiled heads are shared
        clone.params = params
        return clone

    def embed_images(self, images, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if len(images) != len(self.features.valid):
            raise ValueError(
                f"{images.name}: {len(images)} images, but the cached features are of {len(self.features.valid)}"
            )
        return np.asarray(self.project_image(self.params, self.features.image)), self.features.valid

    def embed_texts(self, texts, progress: bool = False) -> np.ndarray:
        if len(texts) != len(self.features.text):  # the split's captions in caption_table order, as cached
            raise ValueError(f"{len(texts)} texts, but the cached features are of {len(self.features.text)} captions")
        return np.asarray(self.project_text(self.params, self.features.text))

    def compose(self, zref, texts) -> None:
        return None


def cached_training(config: TrainConfig, trainable, params: dict, tokenizer: Tokenizer, workdir: Path,
                    progress: bool = True) -> tuple[FeatureBatches, FeatureEmbedder]:  # fmt: skip
    """The batches and the eval split's embedder of a cached-features run (features computed on first use)."""

    check_towers_frozen(config, jax.tree.leaves(param_paths(params)))
    data = config.data
    cached = {}
    for split in (data.train_split, data.eval_split):
        source = parse_source(data.source, split)
        keys = cache_keys(config, data.source, split, tokenizer)
        paths = {k: workdir / "features" / f"{slug(split, keep='_.-')}-{k}-{key}.npz" for k, key in keys.items()}
        cached[split] = tower_features(trainable, params, source, tokenizer, paths, progress)
        if split == data.train_split and config.feature_views > 1:
            crop = f"crop{data.crop_scale[0]:g}-{data.crop_scale[1]:g}-seed{config.seed}"
            view_path = paths["image"].with_name(f"{paths['image'].stem}-{crop}.npz")
            views = augmented_views(trainable, params, source, tokenizer, view_path, config.feature_views,
                                    data.crop_scale, config.seed, progress)  # fmt: skip
            cached[split].image = np.stack([cached[split].image, *views])
    batches = FeatureBatches(cached[data.train_split], config.batch_size, config.captions_per_image, config.seed,
                             trainable.batch_sharding)  # fmt: skip
    return batches, FeatureEmbedder(cached[data.eval_split], trainable)
