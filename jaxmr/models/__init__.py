"""Dual encoders in Flax NNX: ViT / convnet image towers, a Transformer text tower, TIRG fusion."""

from jaxmr.models.dual_encoder import (
    PRESETS,
    ComposedQuery,
    DualEncoder,
    ModelConfig,
    abstract_model,
    l2_normalize,
    parameter_counts,
)
from jaxmr.models.towers import ConvConfig, TextConfig, ViTConfig

__all__ = [
    "PRESETS",
    "ComposedQuery",
    "ConvConfig",
    "DualEncoder",
    "ModelConfig",
    "TextConfig",
    "ViTConfig",
    "abstract_model",
    "l2_normalize",
    "parameter_counts",
]
