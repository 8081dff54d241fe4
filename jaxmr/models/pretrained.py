"""The pretrained towers a model config names (EfficientNet-Lite, MiniLM, MPNet), loaded strictly into a DualEncoder's
parameters."""

from __future__ import annotations

from typing import Any

from jaxmr.models.bert import BertConfig
from jaxmr.models.bert import pretrained_params as bert_params
from jaxmr.models.efficientnet import EfficientNetConfig
from jaxmr.models.efficientnet import pretrained_params as efficientnet_params
from jaxmr.models.mpnet import MPNetConfig
from jaxmr.models.mpnet import pretrained_params as mpnet_params
from jaxmr.models.torch_io import merge_strict


def has_pretrained_towers(model_config: Any) -> bool:
    """Whether the model config names pretrained weights for either tower."""
    return any(getattr(tower, "weights", "") for tower in (model_config.image, model_config.text))


def tower_weights(config: Any) -> dict | None:
    """The pretrained parameters a tower config names (None when it asks for random initialisation)."""
    if isinstance(config, EfficientNetConfig) and config.weights:
        return efficientnet_params(config)
    if isinstance(config, BertConfig) and config.weights:
        return bert_params(config)
    if isinstance(config, MPNetConfig) and config.weights:
        return mpnet_params(config)
    return None


def load_pretrained_towers(model_config: Any, params: dict) -> tuple[dict, list[str]]:
    """`params` (a DualEncoder's pure dict) with the pretrained towers its config names filled in.
    Returns (params, names of the towers loaded)."""
    params = dict(params)
    loaded = []
    for name, tower in (("image_tower", model_config.image), ("text_tower", model_config.text)):
        weights = tower_weights(tower)
        if weights is not None:
            params[name] = merge_strict(params[name], weights, f"{name} ({type(tower).__name__})")
            loaded.append(name)
    return params, loaded
