"""Transformer building blocks shared by the image and text towers.

Parameters carry logical axis names (`nnx.with_partitioning`), activations are constrained by logical names
(`jaxmr.sharding.constrain`); `jaxmr.sharding.LOGICAL_RULES` maps both to the mesh. Compute runs in `dtype`
(e.g. bfloat16) while parameters stay float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmr.sharding import constrain

Dtype = Any
INIT = nnx.initializers.xavier_uniform()


def partitioned(init, axes: Sequence[str | None]):
    """`init` annotated with logical axis names. Parameters are created unsharded (no eager sharding):
    placement is planned once, from these names and the rules table, when the trainer jits the init."""
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def dense(
    din: int, dout: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs, dtype: Dtype = None,
    use_bias: bool = True, init=INIT,
) -> nnx.Linear:  # fmt: skip
    return nnx.Linear(
        din, dout, use_bias=use_bias, dtype=dtype, kernel_init=partitioned(init, axes),
        bias_init=partitioned(nnx.initializers.zeros_init(), axes[1:]), rngs=rngs,
    )  # fmt: skip


def layer_norm(width: int, *, rngs: nnx.Rngs, dtype: Dtype = None, eps: float = 1e-5) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        width, epsilon=eps, dtype=dtype, rngs=rngs,
        scale_init=partitioned(nnx.initializers.ones_init(), ("embed",)),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)),
    )  # fmt: skip


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


# "gelu" is the tanh approximation (big_vision, SigLIP's gelu_pytorch_tanh); "gelu_exact" the erf form (BERT).
ACTIVATIONS = {
    "gelu": jax.nn.gelu,
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


class Mlp(nnx.Module):
    """x [B, L, D] (or [B, D]) -> the same shape, through a hidden layer of `hidden` units."""

    def __init__(self, width: int, hidden: int, *, activation: str, dropout: float, rngs: nnx.Rngs, dtype=None):
        self.fc1 = dense(width, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = dense(hidden, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.activation = ACTIVATIONS[activation]
        # No Dropout module (and so no RNG state in the model) unless dropout is asked for.
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(self.activation(self.fc1(x)), ("batch", "length", "mlp") if x.ndim == 3 else ("batch", "mlp"))
        return self.fc2(self.dropout(h) if self.dropout is not None else h)


def attention(width: int, heads: int, *, rngs: nnx.Rngs, dtype=None, dropout: float = 0.0) -> nnx.MultiHeadAttention:
    return nnx.MultiHeadAttention(
        num_heads=heads, in_features=width, dtype=dtype, decode=False, dropout_rate=dropout, rngs=rngs,
        keep_rngs=dropout > 0,
        kernel_init=partitioned(INIT, ("embed", "heads", "kv")),
        out_kernel_init=partitioned(INIT, ("heads", "kv", "embed")),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("heads", "kv")),
        out_bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)),
    )  # fmt: skip


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)). x: [B, L, D]."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, *, activation: str, dropout: float,
                 rngs: nnx.Rngs, dtype=None, eps: float = 1e-5):  # fmt: skip
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.ln1 = layer_norm(width, rngs=rngs, dtype=dtype, eps=eps)
        self.attn = attention(width, heads, rngs=rngs, dtype=dtype)
        self.ln2 = layer_norm(width, rngs=rngs, dtype=dtype, eps=eps)
        self.mlp = Mlp(width, int(width * mlp_ratio), activation=activation, dropout=dropout, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: [B, L, D]; mask: bool [B, 1, L, L] (True = may attend) or None."""
        x = x + self.attn(self.ln1(x), mask=mask, deterministic=True)
        x = constrain(x, ("batch", "length", "embed"))
        return constrain(x + self.mlp(self.ln2(x)), ("batch", "length", "embed"))


class TransformerEncoder(nnx.Module):
    """A stack of `depth` blocks; `remat` recomputes each block's activations in the backward pass."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0, *, activation: str = "gelu",
                 dropout: float = 0.0, remat: bool = False, rngs: nnx.Rngs, dtype=None, eps: float = 1e-5):  # fmt: skip
        self.blocks = nnx.List(
            [Block(width, heads, mlp_ratio, activation=activation, dropout=dropout, rngs=rngs, dtype=dtype, eps=eps)
             for _ in range(depth)]
        )  # fmt: skip
        self.remat = remat

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        call = nnx.remat(_call_block) if self.remat else _call_block
        for block in self.blocks:
            x = call(block, x, mask)
        return x


def _call_block(block: Block, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return block(x, mask)


def masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    """x [B, L, D], valid bool [B, L] -> the mean over the valid positions [B, D] (zeros where none is)."""
    weights = valid[..., None].astype(x.dtype)
    return (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1)


def param_count(module: nnx.Module) -> int:
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))
