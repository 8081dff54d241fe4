"""The dual encoder (image tower + text tower + projections into one space) and the composed-query fusion.

The model computes no loss: `model(images, tokens)` returns `(zimg, ztxt, extras)` — both L2-normalised
embeddings in float32 and a dict with the logit scale `t`, the sigmoid bias `b` and diagnostics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmr.models.bert import Bert, BertConfig
from jaxmr.models.efficientnet import EfficientNetConfig, EfficientNetLite
from jaxmr.models.layers import Mlp, dense, layer_norm, param_count, partitioned
from jaxmr.models.mpnet import MPNet, MPNetConfig
from jaxmr.models.towers import ConvConfig, ConvNet, TextConfig, TextTransformer, ViT, ViTConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    image: ViTConfig | ConvConfig | EfficientNetConfig = dataclasses.field(default_factory=ViTConfig)
    text: TextConfig | BertConfig | MPNetConfig = dataclasses.field(default_factory=TextConfig)
    embed_dim: int = 256  # the shared space
    # Projection heads from tower features into the shared space: "linear" (CLIP), or "mlp": linear + a residual
    # two-layer GELU MLP of `head_hidden` units with dropout (LiT heads on frozen towers overfit a linear map fast).
    head: str = "linear"
    head_hidden: int = 1024
    head_dropout: float = 0.0
    head_input_dropout: float = 0.0  # dropout on the tower features entering either head kind (training only)
    proj_bias: bool = False  # a bias on the linear heads (SigLIP's text head has one)
    dtype: str = "float32"  # compute dtype ("bfloat16" keeps float32 parameters and a float32 loss)
    remat: bool = False  # recompute each block's activations in the backward pass (saves memory)
    # Pixel normalisation applied on the device to uint8 images: (x / 255 - mean) / std.
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    init_logit_scale: float = 10.0  # t at initialisation (CLIP: 1 / 0.07; SigLIP: 10)
    init_logit_bias: float = -10.0  # b at initialisation (SigLIP)
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")
        if self.head not in ("linear", "mlp"):
            raise ValueError(f"head must be linear or mlp, got {self.head!r}")
        for name in ("head_dropout", "head_input_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


class ProjectionHead(nnx.Module):
    """features [B, din] -> [B, dout]: a linear map plus a residual GELU MLP (the "mlp" head).

    Dropout is functional (`key`), so the model holds no RNG state; without a key it is off (evaluation)."""

    def __init__(self, din: int, dout: int, hidden: int, dropout: float, *, rngs: nnx.Rngs, dtype=None):
        self.linear = dense(din, dout, ("embed", None), use_bias=False, rngs=rngs, dtype=dtype)
        self.norm = layer_norm(din, rngs=rngs, dtype=dtype)
        self.fc1 = dense(din, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = dense(hidden, dout, ("mlp", None), rngs=rngs, dtype=dtype, init=nnx.initializers.zeros_init())
        self.dropout = dropout

    def __call__(self, x: jax.Array, key: jax.Array | None = None, repeat: int = 1) -> jax.Array:
        """x [B, din] -> [B * repeat, dout]: each row's output `repeat` times in a row, the hidden dropout drawn
        for each copy (so k captions of one image see k dropouts of its head, at the cost of one fc1)."""
        h = jnp.repeat(jax.nn.gelu(self.fc1(self.norm(x))), repeat, axis=0)
        if key is not None:
            h = dropout(h, self.dropout, key)
        return jnp.repeat(self.linear(x), repeat, axis=0) + self.fc2(h)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout: each entry zeroed with probability `rate`, the rest scaled by 1 / (1 - rate)."""
    if rate <= 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def make_image_tower(config: ViTConfig | ConvConfig | EfficientNetConfig, *, remat: bool, rngs: nnx.Rngs, dtype=None):
    if isinstance(config, ViTConfig):
        return ViT(config, remat=remat, rngs=rngs, dtype=dtype)
    if isinstance(config, ConvConfig):
        return ConvNet(config, remat=remat, rngs=rngs, dtype=dtype)
    if isinstance(config, EfficientNetConfig):
        return EfficientNetLite(config, rngs=rngs, dtype=dtype)
    raise TypeError(f"unknown image tower config {type(config).__name__}")


def make_text_tower(config: TextConfig | BertConfig | MPNetConfig, *, remat: bool, rngs: nnx.Rngs, dtype=None):
    if isinstance(config, TextConfig):
        return TextTransformer(config, remat=remat, rngs=rngs, dtype=dtype)
    if isinstance(config, BertConfig):
        return Bert(config, rngs=rngs, dtype=dtype)
    if isinstance(config, MPNetConfig):
        return MPNet(config, rngs=rngs, dtype=dtype)
    raise TypeError(f"unknown text tower config {type(config).__name__}")


def make_head(config: ModelConfig, din: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """The projection from a tower's width `din` to `config.embed_dim`: linear or `ProjectionHead`."""
    dtype = DTYPES[config.dtype]
    if config.head == "linear":
        return dense(din, config.embed_dim, ("embed", None), use_bias=config.proj_bias, rngs=rngs, dtype=dtype)
    return ProjectionHead(din, config.embed_dim, config.head_hidden, config.head_dropout, rngs=rngs, dtype=dtype)


class DualEncoder(nnx.Module):
    """Image and text towers projected into a shared `embed_dim` space with a learnable temperature."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = DTYPES[config.dtype]
        self.image_tower = make_image_tower(config.image, remat=config.remat, rngs=rngs, dtype=dtype)
        self.text_tower = make_text_tower(config.text, remat=config.remat, rngs=rngs, dtype=dtype)

        self.image_proj = make_head(config, config.image.width, rngs=rngs)
        self.text_proj = make_head(config, config.text.width, rngs=rngs)
        self.log_t = nnx.Param(jnp.asarray(math.log(config.init_logit_scale), jnp.float32))
        self.b = nnx.Param(jnp.asarray(config.init_logit_bias, jnp.float32))

    def _pixels(self, images: jax.Array) -> jax.Array:
        mean = jnp.asarray(self.config.pixel_mean, jnp.float32)
        std = jnp.asarray(self.config.pixel_std, jnp.float32)
        x = (images.astype(jnp.float32) / 255.0 - mean) / std
        return x.astype(DTYPES[self.config.dtype])

    def image_tower_features(self, images: jax.Array) -> jax.Array:
        """uint8 [B, H, W, 3] -> the image tower's output [B, image width] (what LiT caches)."""
        return self.image_tower(self._pixels(images))

    def project_image(self, features: jax.Array, key: jax.Array | None = None, repeat: int = 1) -> jax.Array:
        """Image tower features [B, width] -> unnormalised float32 [B * repeat, embed_dim] (`key` enables head
        dropout; `repeat` gives each image's embedding that many times, with its own hidden dropout each)."""
        return self._project(self.image_proj, features, key, repeat)

    def project_text(self, features: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Text tower features [B, width] -> unnormalised float32 [B, embed_dim]."""
        return self._project(self.text_proj, features, key)

    def _project(self, head: nnx.Module, features: jax.Array, key: jax.Array | None, repeat: int = 1) -> jax.Array:
        k_in, k_head = (None, None) if key is None else jax.random.split(key)
        if key is not None:
            features = dropout(features, self.config.head_input_dropout, k_in)
        if isinstance(head, ProjectionHead):
            out = head(features, k_head, repeat)
        else:
            out = jnp.repeat(head(features), repeat, axis=0)
        return out.astype(jnp.float32)

    def image_features(self, images: jax.Array) -> jax.Array:
        """uint8 [B, H, W, 3] -> projected, unnormalised float32 [B, embed_dim]."""
        return self.project_image(self.image_tower_features(images))

    def text_features(self, tokens: jax.Array) -> jax.Array:
        """int [B, L] -> projected, unnormalised float32 [B, embed_dim]."""
        return self.project_text(self.text_tower(tokens))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """uint8 [B, H, W, 3] -> L2-normalised float32 [B, embed_dim]."""
        return l2_normalize(self.image_features(images))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """int [B, L] -> L2-normalised float32 [B, embed_dim]."""
        return l2_normalize(self.text_features(tokens))

    @property
    def logit_scale(self) -> jax.Array:
        return jnp.exp(jnp.minimum(self.log_t[...], math.log(self.config.max_logit_scale)))

    def __call__(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
        """images uint8 [B, H, W, 3], tokens int [B, L] -> (zimg [B, E], ztxt [B, E], extras)."""
        img, txt = self.image_features(images), self.text_features(tokens)
        extras = {
            "t": self.logit_scale,
            "b": self.b[...],
            "img/norm": jnp.linalg.norm(img, axis=-1).mean(),
            "txt/norm": jnp.linalg.norm(txt, axis=-1).mean(),
        }
        return l2_normalize(img), l2_normalize(txt), extras


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class ComposedQuery(nnx.Module):
    """Text-Image Residual Gating (TIRG): fuses a reference image and a modification text into a query.

    f = w_g * sigmoid(W2 relu(W1 [zimg, ztxt])) * zimg + w_r * MLP([zimg, ztxt]); returned L2-normalised.
    zimg, ztxt: [B, E] -> [B, E]. Trained with `softmax_loss(f, ztarget, t)` against target-image embeddings.
    """

    def __init__(self, embed_dim: int, hidden: int | None = None, *, rngs: nnx.Rngs):
        hidden = hidden or 2 * embed_dim
        self.gate_in = dense(2 * embed_dim, hidden, (None, "mlp"), rngs=rngs)
        self.gate_out = dense(hidden, embed_dim, ("mlp", None), rngs=rngs)
        self.residual_in = layer_norm(2 * embed_dim, rngs=rngs)
        self.residual = Mlp(2 * embed_dim, hidden, activation="relu", dropout=0.0, rngs=rngs)
        self.residual_out = dense(2 * embed_dim, embed_dim, (None, None), rngs=rngs)
        self.w_gate = nnx.Param(partitioned(nnx.initializers.ones_init(), ())(rngs.params(), ()))
        self.w_residual = nnx.Param(partitioned(nnx.initializers.constant(0.1), ())(rngs.params(), ()))

    def __call__(self, zimg: jax.Array, ztxt: jax.Array) -> jax.Array:
        if zimg.shape != ztxt.shape:
            raise ValueError(f"zimg and ztxt must have the same shape [B, E]; got {zimg.shape} and {ztxt.shape}")
        both = jnp.concatenate([zimg, ztxt], axis=-1)
        gate = jax.nn.sigmoid(self.gate_out(jax.nn.relu(self.gate_in(both))))
        residual = self.residual_out(self.residual(self.residual_in(both)))
        return l2_normalize(self.w_gate[...] * gate * zimg + self.w_residual[...] * residual)


class Composer(nnx.Module):
    """The composed-query model: its own copy of the text tower and text projection (initialised from a trained
    dual encoder's, then fine-tuned or kept frozen) reads the modification sentence, and TIRG fuses it with the
    reference image's embedding. zref [B, E] (L2-normalised), tokens int [B, L] -> [B, E] L2-normalised."""

    def __init__(self, config: ModelConfig, hidden: int = 0, *, rngs: nnx.Rngs):
        self.config = config
        self.text_tower = make_text_tower(config.text, remat=False, rngs=rngs, dtype=DTYPES[config.dtype])
        self.text_proj = make_head(config, config.text.width, rngs=rngs)
        self.fusion = ComposedQuery(config.embed_dim, hidden or None, rngs=rngs)
        self.log_t = nnx.Param(jnp.asarray(math.log(10.0), jnp.float32))
        self.b = nnx.Param(jnp.asarray(config.init_logit_bias, jnp.float32))  # the sigmoid loss's bias

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """int [B, L] -> L2-normalised float32 [B, E]."""
        return l2_normalize(self.text_proj(self.text_tower(tokens)).astype(jnp.float32))

    @property
    def logit_scale(self) -> jax.Array:
        return jnp.exp(jnp.minimum(self.log_t[...], math.log(self.config.max_logit_scale)))

    def __call__(self, zref: jax.Array, tokens: jax.Array) -> jax.Array:
        return self.fusion(zref, self.encode_text(tokens))


# --------------------------------------------------------------------------------------------------- presets


def _clip(*, patch: int, width: int, depth: int, heads: int, text_width: int, text_heads: int, embed_dim: int):
    """OpenAI CLIP's layout: 224px ViT with CLS pooling, 12-layer causal text tower, QuickGELU."""
    return ModelConfig(
        image=ViTConfig(image_size=224, patch=patch, width=width, depth=depth, heads=heads, activation="quick_gelu"),
        text=TextConfig(vocab_size=49408, max_len=77, width=text_width, depth=12, heads=text_heads, causal=True,
                        activation="quick_gelu"),
        embed_dim=embed_dim,
        init_logit_scale=1 / 0.07,
    )  # fmt: skip


PRESETS: dict[str, ModelConfig] = {
    # ViT d192x4 on 64x64 + text d192x4: the CPU throughput comparison with PyTorch (bench/train_throughput.py).
    # Mean pooling: from scratch, a CLS token sits on a long plateau first (measured: loss 2.7 vs 0.75 after
    # 50 steps on a fixed batch of 32), as "Better plain ViT baselines" also found for GAP.
    "tiny": ModelConfig(
        image=ViTConfig(image_size=64, patch=8, width=192, depth=4, heads=3, pool="mean"),
        text=TextConfig(vocab_size=1024, max_len=32, width=192, depth=4, heads=3),
        embed_dim=192,
    ),
    "tiny_conv": ModelConfig(
        image=ConvConfig(image_size=64, channels=(32, 64, 128, 192)),
        text=TextConfig(vocab_size=1024, max_len=32, width=192, depth=4, heads=3),
        embed_dim=192,
    ),
    # CLIP-like sizes: ViT-S/16, ViT-B/16, ViT-L/14 with CLIP's text towers (BPE vocab 49408, 77 tokens, causal).
    "s16": _clip(patch=16, width=384, depth=12, heads=6, text_width=384, text_heads=6, embed_dim=384),
    "b16": _clip(patch=16, width=768, depth=12, heads=12, text_width=512, text_heads=8, embed_dim=512),
    "l14": _clip(patch=14, width=1024, depth=24, heads=16, text_width=768, text_heads=12, embed_dim=768),
}


def abstract_model(config: ModelConfig) -> DualEncoder:
    """The model's structure with shapes only (nothing allocated): for counting and sharding plans."""
    return nnx.eval_shape(lambda: DualEncoder(config, rngs=nnx.Rngs(0)))


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters of each part, counted without allocating the model."""
    model = abstract_model(config)
    image = param_count(model.image_tower) + param_count(model.image_proj)
    text = param_count(model.text_tower) + param_count(model.text_proj)
    return {"image": image, "text": text, "total": param_count(model)}


def model_graph(config: ModelConfig) -> tuple[nnx.GraphDef, dict, nnx.State]:
    """(graphdef, abstract params as a pure dict of ShapeDtypeStructs, their Variables for sharding rules).

    Traced once per config and process (tracing a pretrained tower pair's construction takes ~1.5 s, and a run
    asks for its graph several times: training, evaluation, export); the Variables are shared, not to be changed."""
    graphdef, state = _model_graph(config)
    return graphdef, nnx.to_pure_dict(state), state


@functools.lru_cache(maxsize=8)
def _model_graph(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(abstract_model(config))
