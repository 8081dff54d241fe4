"""The towers: a ViT and a small CPU-friendly convnet for images, a Transformer encoder for text.

Every tower maps its input to features [B, width]; the dual encoder projects them into the shared space.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmr.models.layers import Mlp, TransformerEncoder, attention, layer_norm, masked_mean, partitioned
from jaxmr.sharding import constrain

Pool = Literal["cls", "mean", "map"]
PosEmb = Literal["learn", "sincos2d"]
TextPool = Literal["eos", "cls", "mean", "last", "argmax"]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 64  # input side in pixels
    patch: int = 8  # patch side in pixels
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    pool: Pool = "cls"  # cls token, mean of patch tokens, or "map" (attention pooling with a learned probe)
    activation: str = "gelu"
    ln_pre: bool = True  # LayerNorm before the blocks, as in CLIP (SigLIP has none)
    ln_eps: float = 1e-5  # CLIP 1e-5, SigLIP 1e-6
    patch_bias: bool = False  # a bias on the patch convolution (SigLIP has one, CLIP not)
    dropout: float = 0.0
    # "patch": one patch x patch convolution (CLIP); "conv": a stack of 3x3 stride-2 convolutions reaching the
    # same patch size ("Early convolutions help transformers see better", Xiao et al. 2021): on small data
    # from scratch it optimises much faster.
    stem: str = "patch"
    # "learn": a learned position embedding (CLIP, SigLIP); "sincos2d": fixed 2-D sine-cosine features of each
    # patch's row and column (big_vision's default, MoCo v3): the tokens know where they are from step 0.
    posemb: PosEmb = "learn"

    def __post_init__(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"ViT stem must be patch or conv, got {self.stem!r}")
        if self.stem == "conv" and (self.patch & (self.patch - 1) or self.patch < 2):
            raise ValueError(f"a conv stem needs a power-of-two patch size, got {self.patch}")
        if self.pool not in ("cls", "mean", "map"):
            raise ValueError(f"ViT pool must be cls, mean or map, got {self.pool!r}")
        if self.posemb not in ("learn", "sincos2d"):
            raise ValueError(f"ViT posemb must be learn or sincos2d, got {self.posemb!r}")
        if self.posemb == "sincos2d" and self.width % 4:
            raise ValueError(f"a sincos2d position embedding needs a width divisible by 4, got {self.width}")


def sincos_2d(side: int, width: int, temperature: float = 10_000.0) -> jax.Array:
    """Fixed position features of a side x side grid, row-major: [side * side, width] (width % 4 == 0).

    A quarter of the channels is sin(column * w_k), a quarter cos(column * w_k), then the same for the row, with
    frequencies w_k = temperature ** (-k / (width / 4 - 1)) from 1 down to 1 / temperature."""
    quarter = width // 4
    omega = 1.0 / temperature ** (jnp.arange(quarter) / max(quarter - 1, 1))
    row, col = jnp.meshgrid(jnp.arange(side), jnp.arange(side), indexing="ij")
    x = col.reshape(-1, 1) * omega[None]
    y = row.reshape(-1, 1) * omega[None]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1).astype(jnp.float32)


class MapHead(nnx.Module):
    """Multihead attention pooling (big_vision's MAPHead, SigLIP's pooling head): a learned probe attends over
    the tokens, then a residual MLP. x [B, L, D] -> [B, D]."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, *, activation: str = "gelu",
                 eps: float = 1e-5, rngs: nnx.Rngs, dtype=None):  # fmt: skip
        self.probe = nnx.Param(
            partitioned(nnx.initializers.normal(0.02), (None, None, "embed"))(rngs.params(), (1, 1, width))
        )
        self.attn = attention(width, heads, rngs=rngs, dtype=dtype)
        self.ln = layer_norm(width, rngs=rngs, dtype=dtype, eps=eps)
        self.mlp = Mlp(width, int(width * mlp_ratio), activation=activation, dropout=0.0, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        h = self.attn(probe, x, deterministic=True)
        return (h + self.mlp(self.ln(h)))[:, 0]


class ConvStem(nnx.Module):
    """log2(patch) 3x3 stride-2 convolutions with GELU, widening to `width`. [B, H, W, 3] -> [B, H/p, W/p, width]."""

    def __init__(self, patch: int, width: int, *, rngs: nnx.Rngs, dtype=None):
        n = patch.bit_length() - 1
        channels = [3] + [max(width >> (n - k), 16) for k in range(1, n)] + [width]
        kernel = partitioned(nnx.initializers.lecun_normal(), (None, None, "conv_in", "conv_out"))
        self.convs = nnx.List([
            nnx.Conv(cin, cout, (3, 3), strides=(2, 2), dtype=dtype, kernel_init=kernel, rngs=rngs)
            for cin, cout in itertools.pairwise(channels)
        ])  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        for k, conv in enumerate(self.convs):
            x = conv(x)
            x = jax.nn.gelu(x) if k < len(self.convs) - 1 else x
        return x


class ViT(nnx.Module):
    """Vision Transformer. images float [B, H, W, 3] (already normalised) -> features [B, width]."""

    def __init__(self, config: ViTConfig, *, remat: bool = False, rngs: nnx.Rngs, dtype=None):
        c = self.config = config
        if c.stem == "conv":
            self.patchify = ConvStem(c.patch, c.width, rngs=rngs, dtype=dtype)
        else:
            self.patchify = nnx.Conv(
                3, c.width, (c.patch, c.patch), strides=(c.patch, c.patch), padding="VALID", use_bias=c.patch_bias,
                dtype=dtype, rngs=rngs, bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)),
                kernel_init=partitioned(nnx.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
            )  # fmt: skip
        n_tokens = (c.image_size // c.patch) ** 2 + (c.pool == "cls")
        init = nnx.initializers.normal(0.02)
        if c.posemb == "learn":
            self.pos_embed = nnx.Param(
                partitioned(init, (None, "length", "embed"))(rngs.params(), (1, n_tokens, c.width))
            )
        if c.pool == "cls":
            self.cls_token = nnx.Param(partitioned(init, (None, None, "embed"))(rngs.params(), (1, 1, c.width)))
        self.ln_pre = layer_norm(c.width, rngs=rngs, dtype=dtype, eps=c.ln_eps) if c.ln_pre else None
        self.encoder = TransformerEncoder(
            c.width, c.depth, c.heads, c.mlp_ratio, activation=c.activation, dropout=c.dropout, remat=remat,
            rngs=rngs, dtype=dtype, eps=c.ln_eps,
        )  # fmt: skip
        self.ln_post = layer_norm(c.width, rngs=rngs, dtype=dtype, eps=c.ln_eps)
        self.map_head = (
            MapHead(c.width, c.heads, c.mlp_ratio, activation=c.activation, eps=c.ln_eps, rngs=rngs, dtype=dtype)
            if c.pool == "map"
            else None
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.shape[1:] != (self.config.image_size, self.config.image_size, 3):
            raise ValueError(f"ViT expects images [B, {self.config.image_size}, {self.config.image_size}, 3], "
                             f"got {images.shape}")  # fmt: skip
        x = self.patchify(images)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        c = self.config
        if c.posemb == "sincos2d":  # the patches only; a CLS token carries no position
            x = x + sincos_2d(c.image_size // c.patch, c.width).astype(x.dtype)[None]
        if c.pool == "cls":
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        if c.posemb == "learn":
            x = x + self.pos_embed[...].astype(x.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        x = self.encoder(x)
        if self.config.pool == "map":
            return self.map_head(self.ln_post(x))
        x = x[:, 0] if self.config.pool == "cls" else x.mean(axis=1)
        return self.ln_post(x)


@dataclasses.dataclass(frozen=True)
class ConvConfig:
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128, 256)  # one stage each; every stage halves the resolution
    blocks_per_stage: int = 1

    def __post_init__(self) -> None:
        if not self.channels:
            raise ValueError("ConvConfig.channels needs at least one stage")

    @property
    def width(self) -> int:
        return self.channels[-1]


class ConvBlock(nnx.Module):
    """3x3 conv -> GroupNorm -> GELU, twice, with a residual connection. x [B, H, W, C] -> same shape."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=None):
        kernel = partitioned(nnx.initializers.lecun_normal(), (None, None, "conv_in", "conv_out"))
        self.conv1 = nnx.Conv(channels, channels, (3, 3), dtype=dtype, kernel_init=kernel, rngs=rngs)
        self.norm1 = nnx.GroupNorm(channels, num_groups=min(8, channels), dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(channels, channels, (3, 3), dtype=dtype, kernel_init=kernel, rngs=rngs)
        self.norm2 = nnx.GroupNorm(channels, num_groups=min(8, channels), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.norm1(self.conv1(x)))
        return jax.nn.gelu(x + self.norm2(self.conv2(h)))


class ConvNet(nnx.Module):
    """A small residual convnet, cheap on CPUs. images float [B, H, W, 3] -> features [B, channels[-1]]."""

    def __init__(self, config: ConvConfig, *, remat: bool = False, rngs: nnx.Rngs, dtype=None):
        self.config = config
        kernel = partitioned(nnx.initializers.lecun_normal(), (None, None, "conv_in", "conv_out"))
        downs, stages = [], []
        previous = 3
        for channels in config.channels:
            downs.append(
                nnx.Conv(previous, channels, (3, 3), strides=(2, 2), dtype=dtype, kernel_init=kernel, rngs=rngs)
            )
            stages.append(
                nnx.List([ConvBlock(channels, rngs=rngs, dtype=dtype) for _ in range(config.blocks_per_stage)])
            )
            previous = channels
        self.downs, self.stages = nnx.List(downs), nnx.List(stages)
        self.ln = layer_norm(config.width, rngs=rngs, dtype=dtype)
        self.remat = remat

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for down, stage in zip(self.downs, self.stages, strict=True):
            x = jax.nn.gelu(down(x))
            for block in stage:
                x = (nnx.remat(_call) if self.remat else _call)(block, x)
        return self.ln(x.mean(axis=(1, 2)))


def _call(block: nnx.Module, x: jax.Array) -> jax.Array:
    return block(x)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 1024
    max_len: int = 32
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    causal: bool = False  # causal attention (CLIP) or bidirectional (BERT, SigLIP)
    # "eos": the last real token; "cls": the first token (CLS / BOS); "mean": the masked mean; "last": the last
    # position, padding or not (SigLIP, whose captions are padded to a fixed length); "argmax": the position of
    # the largest token id (OpenAI CLIP: EOS has the largest id)
    pool: TextPool = "eos"
    pad_id: int = 0
    mask_padding: bool = True  # keys at pad_id are not attended to (SigLIP attends to its padding; CLIP is causal)
    activation: str = "gelu"
    ln_eps: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.pool not in ("eos", "cls", "mean", "last", "argmax"):
            raise ValueError(f"text pool must be eos, cls, mean, last or argmax, got {self.pool!r}")

    @property
    def padding_is_inert(self) -> bool:
        """Whether trailing padding leaves the features unchanged (then batches may be cut to their longest text)."""
        return (self.mask_padding or self.causal) and self.pool != "last"


class TextTransformer(nnx.Module):
    """Transformer text encoder. tokens int [B, L] (padded with pad_id) -> features [B, width]."""

    def __init__(self, config: TextConfig, *, remat: bool = False, rngs: nnx.Rngs, dtype=None):
        c = self.config = config
        self.token_embed = nnx.Embed(
            c.vocab_size, c.width, dtype=dtype, rngs=rngs,
            embedding_init=partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")),
        )  # fmt: skip
        self.pos_embed = nnx.Param(
            partitioned(nnx.initializers.normal(0.01), (None, "length", "embed"))(
                rngs.params(), (1, c.max_len, c.width)
            )
        )
        self.encoder = TransformerEncoder(
            c.width, c.depth, c.heads, c.mlp_ratio, activation=c.activation, dropout=c.dropout, remat=remat,
            rngs=rngs, dtype=dtype, eps=c.ln_eps,
        )  # fmt: skip
        self.ln_final = layer_norm(c.width, rngs=rngs, dtype=dtype, eps=c.ln_eps)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        if tokens.ndim != 2 or tokens.shape[1] > c.max_len:
            raise ValueError(f"text tower expects tokens [B, L <= {c.max_len}], got {tokens.shape}")
        length = tokens.shape[1]
        valid = tokens != c.pad_id  # [B, L]
        x = self.token_embed(tokens) + self.pos_embed[:, :length].astype(self.token_embed.embedding.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        mask = valid[:, None, None, :] if c.mask_padding else None  # keys that may be attended to
        if c.causal:
            causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
            mask = causal if mask is None else mask & causal
        x = self.ln_final(self.encoder(x, mask))
        if c.pool == "cls":
            return x[:, 0]
        if c.pool == "last":
            return x[:, -1]
        if c.pool == "argmax":
            return jnp.take_along_axis(x, jnp.argmax(tokens, axis=1)[:, None, None], axis=1)[:, 0]
        if c.pool == "mean":
            return masked_mean(x, valid)
        last = jnp.maximum(valid.sum(axis=1) - 1, 0)  # EOS: the last real token
        return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
