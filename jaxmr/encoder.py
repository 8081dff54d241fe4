"""The serving side of a trained model: jitted text and image encoders over fixed batch buckets.

`Encoder` pads every batch up to one of a few bucket sizes (and cuts text to one of a few lengths), so that a
warmed-up encoder never compiles again whatever batch a request brings."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from jaxmr.config import TrainConfig
from jaxmr.data.images import center_square, load_image
from jaxmr.export import ModelMismatchError, load_composer, load_export
from jaxmr.models.dual_encoder import model_graph
from jaxmr.sharding import make_mesh
from jaxmr.text import Tokenizer, cut_padding

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Token lengths a text batch is cut to (then max_len), where the text tower ignores padding: a query of a few words
# costs a 16-token pass, not a max_len one (MPNet at batch 1: 30 ms at 16 tokens, 89 ms at 64 on 2 cores).
TEXT_LENGTHS = (16, 32)


class Encoder:
    """Jitted text and image encoders of one model, with fixed batch buckets and explicit shardings.

    A batch is padded to the smallest bucket that holds it (larger batches go through in chunks of the largest
    bucket), so the set of compiled shapes is fixed: `warm_up()` compiles them all. Buckets that divide over the
    devices are split across them (data parallel); smaller ones run replicated.
    """

    def __init__(
        self,
        config: TrainConfig,
        params: dict,
        tokenizer: Tokenizer,
        fingerprint: str,
        buckets: Sequence[int] = BUCKETS,
        mesh: jax.sharding.Mesh | None = None,
        composer: tuple[nnx.GraphDef, dict] | None = None,
    ):
        self.config, self.tokenizer, self.fingerprint = config, tokenizer, fingerprint
        self.image_size = config.data.image_size
        self.embed_dim = config.model.embed_dim
        self.buckets = tuple(sorted(set(buckets)))
        max_len, cut = tokenizer.max_len, config.model.text.padding_is_inert
        self.text_lengths = (*(n for n in TEXT_LENGTHS if n < max_len and cut), max_len)
        self.mesh = mesh or make_mesh(devices=jax.local_devices())  # a multi-process build encodes locally
        graphdef, abstract, _ = model_graph(config.model)
        if jax.tree.structure(abstract) != jax.tree.structure(params):
            raise ModelMismatchError("the exported parameters do not match the model config's structure")
        replicated = NamedSharding(self.mesh, P())
        self.params = jax.device_put(params, replicated)
        n_devices = self.mesh.devices.size
        self._jitted: dict[tuple[str, int], Any] = {}
        for bucket in self.buckets:
            batch = NamedSharding(self.mesh, P(self.mesh.axis_names)) if bucket % n_devices == 0 else replicated
            self._jitted["image", bucket] = (
                jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_image(x), in_shardings=(replicated, batch),
                        out_shardings=replicated),
                batch,
            )  # fmt: skip
            self._jitted["text", bucket] = (
                jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_text(x), in_shardings=(replicated, batch),
                        out_shardings=replicated),
                batch,
            )  # fmt: skip
        # A trained composed-query model (`jaxmr.training.composed`): reference embedding + modification -> query.
        self.composer_params = None
        if composer is not None:
            composer_graph, composer_params = composer
            self.composer_params = jax.device_put(composer_params, replicated)
            for bucket in self.buckets:
                batch = NamedSharding(self.mesh, P(self.mesh.axis_names)) if bucket % n_devices == 0 else replicated
                self._jitted["compose", bucket] = (
                    jax.jit(lambda p, z, t: nnx.merge(composer_graph, p)(z, t),
                            in_shardings=(replicated, batch, batch), out_shardings=replicated),
                    batch,
                )  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike, buckets: Sequence[int] = BUCKETS) -> Encoder:
        """An encoder from an export directory (`jaxmr.export`), with its composer when it has one."""
        config, params, tokenizer, meta = load_export(path)
        composer = load_composer(path, config.model)
        return cls(config, params, tokenizer, meta["fingerprint"], buckets, composer=composer)

    def bucket(self, n: int) -> int:
        """The batch size `n` rows are padded to (the largest bucket when none holds them)."""
        return next((b for b in self.buckets if b >= n), self.buckets[-1])

    def _run(self, kind: str, *inputs: np.ndarray) -> np.ndarray:
        n = len(inputs[0])
        out = np.zeros((n, self.embed_dim), np.float32)
        params = self.composer_params if kind == "compose" else self.params
        start = 0
        while start < n:
            size = self.bucket(n - start)
            fn, sharding = self._jitted[kind, size]
            padded = []
            for x in inputs:
                chunk = x[start : start + size]
                pad = np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)
                padded.append(jax.device_put(np.concatenate([chunk, pad]), sharding))
            z = fn(params, *padded)
            rows = min(size, n - start)
            out[start : start + rows] = np.asarray(z)[:rows]
            start += rows
        return out

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] (S = `image_size`) -> L2-normalised float32 [N, E]."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"images must be [N, {self.image_size}, {self.image_size}, 3], got {images.shape}")
        return self._run("image", images.astype(np.uint8, copy=False))

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """int32 [N, max_len] -> L2-normalised float32 [N, E] (the padding cut to one of `text_lengths`)."""
        return self._run("text", cut_padding(np.asarray(tokens, np.int32), self.tokenizer.pad_id, self.text_lengths))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """N strings -> L2-normalised float32 [N, E]."""
        return self.encode_tokens(self.tokenizer.encode(list(texts)))

    @property
    def has_composer(self) -> bool:
        return self.composer_params is not None

    def compose(self, zref: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """Composed queries with the trained composer: reference image embeddings [N, E] and N modification
        sentences -> L2-normalised float32 [N, E]."""
        if not self.has_composer:
            raise ValueError("this model has no trained composer (train one with configs/shapes_composed.py)")
        zref = np.asarray(zref, np.float32).reshape(-1, self.embed_dim)
        if len(zref) != len(texts):
            raise ValueError(f"{len(zref)} reference embeddings but {len(texts)} texts")
        return self._run("compose", zref, self.tokenizer.encode(list(texts)).astype(np.int32))

    def preprocess(self, image: np.ndarray | bytes | str | Image.Image) -> np.ndarray:
        """Any image a record or an upload may hold -> uint8 [S, S, 3] (shorter side to S, central square).
        Raises `ImageReadError` for data that is not a readable image."""
        if isinstance(image, np.ndarray) and image.shape == (self.image_size, self.image_size, 3):
            return image.astype(np.uint8, copy=False)
        pil = image.convert("RGB") if isinstance(image, Image.Image) else load_image(image, min_side=self.image_size)
        return center_square(pil, self.image_size)

    def warm_up(self) -> int:
        """Compiles every bucket of both encoders (each text length for text); returns `compiled_count()`."""
        tokens = lambda b, n=self.tokenizer.max_len: np.zeros((b, n), np.int32)
        for (kind, bucket), (fn, sharding) in self._jitted.items():
            inputs = {
                "image": lambda b: [[np.zeros((b, self.image_size, self.image_size, 3), np.uint8)]],
                "text": lambda b: [[tokens(b, n)] for n in self.text_lengths],
                "compose": lambda b: [[np.zeros((b, self.embed_dim), np.float32), tokens(b)]],
            }[kind](bucket)
            params = self.composer_params if kind == "compose" else self.params
            for shape in inputs:
                jax.block_until_ready(fn(params, *(jax.device_put(x, sharding) for x in shape)))
        return self.compiled_count()

    def compiled_count(self) -> int:
        """Compiled executables across all buckets (a warmed encoder answers every request from these)."""
        return sum(fn._cache_size() for fn, _ in self._jitted.values())
