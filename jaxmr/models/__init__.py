"""Dual encoders in Flax NNX: ViT / convnet / EfficientNet-Lite image towers, Transformer / BERT / MPNet text towers,
TIRG fusion, and loaders for pretrained weights."""

from jaxmr.models.bert import BertConfig
from jaxmr.models.dual_encoder import (
    PRESETS,
    ComposedQuery,
    Composer,
    DualEncoder,
    ModelConfig,
    abstract_model,
    l2_normalize,
    model_graph,
    parameter_counts,
)
from jaxmr.models.efficientnet import EfficientNetConfig
from jaxmr.models.mpnet import MPNetConfig
from jaxmr.models.towers import ConvConfig, TextConfig, ViTConfig

__all__ = [
    "PRESETS",
    "BertConfig",
    "ComposedQuery",
    "Composer",
    "ConvConfig",
    "DualEncoder",
    "EfficientNetConfig",
    "MPNetConfig",
    "ModelConfig",
    "TextConfig",
    "ViTConfig",
    "abstract_model",
    "l2_normalize",
    "model_graph",
    "parameter_counts",
]
