"""The built-in default: the tiny dual encoder trained on the shapes world, on a 2-core CPU in minutes.

    jaxmr train --config configs/shapes_tiny.py --workdir runs/shapes_tiny
    jaxmr eval --workdir runs/shapes_tiny --split test --json

`get_config("smoke")` is a few-step variant for tests.
"""

import dataclasses

from jaxmr.config import DataConfig, LossConfig, OptimConfig, TrainConfig
from jaxmr.models import ModelConfig, TextConfig, ViTConfig


def get_config(arg: str | None = None) -> TrainConfig:
    # Narrower and shallower than the "tiny" preset (2.5x the examples/s on 2 cores: more epochs inside the
    # 10-minute budget than the extra width is worth), with a convolutional stem: after 200 steps of batch 128
    # it reaches val t2i R@1 0.255 / R@5 0.757 where the patch stem has 0.138 / 0.525.
    # 48 px: 1.5x the examples/s of 64 px at the same accuracy per step (val t2i R@1 0.339 vs 0.353 at step 500).
    model = ModelConfig(
        image=ViTConfig(image_size=48, patch=8, width=128, depth=3, heads=4, pool="mean", stem="conv"),
        # Mean pooling of the caption's tokens, not the EOS token: val t2i R@1 0.662 / 0.662 / 0.641 after 1,450
        # steps (seeds 0 / 1 / 2; test 0.673 / 0.683 / 0.654) against 0.587 / 0.563 / 0.525 with EOS pooling:
        # two layers are too few to gather a whole caption into its last token.
        text=TextConfig(vocab_size=1024, max_len=32, width=128, depth=2, heads=4, pool="mean"),
        embed_dim=128,
    )
    config = TrainConfig(
        model=model,
        # shuffle_group=2 puts every twin pair (same words, different meaning) in the same batch
        # 30,000 training images: at 10,000 the model starts to memorise (val t2i R@1 0.543 after 1,500 steps,
        # 0.587 with 30,000 after 1,450); 100,000 is no better (0.581). read_threads=0: reading a cached render
        # is cheap, and grain's reader threads cost 3x the CPU of reading inline (124 vs 41 ms per batch),
        # CPU the train step needs on 2 cores (0.323 s/step against 0.416). Sensitive (single runs, EOS text
        # pooling, seed 0 at val 0.587): 1,650 steps gave val 0.538 and 1,700 0.559, a 3-layer text tower 0.508,
        # lr 1.5e-3 0.527, an initial logit scale of 20 0.521, MAP image pooling 0.521, sincos2d image positions
        # 0.533: differences of a few points between variants are noise (seeds alone span 0.06).
        data=DataConfig(
            source="shapes:n=30000,size=48,seed=0",
            image_size=48,
            vocab_size=1024,
            max_len=32,
            shuffle_group=2,
            read_threads=0,
        ),
        optim=OptimConfig(lr=2e-3, warmup_steps=50, weight_decay=0.05),
        loss=LossConfig(name="softmax"),
        batch_size=128,  # more updates per example than 256 is faster in wall-clock; 64 is worse (R@1 0.448)
        # Two captions per image (captions_per_image=2) in the same wall-clock, seed 0: val 0.656 with 256
        # captions of 128 images for 1,140 steps, 0.649 with 192 of 96 for 1,660, against 0.662: ahead early
        # (0.381 vs 0.299 at step 500), level at the end.
        steps=1450,
        eval_every=500,
        checkpoint_every=500,
    )
    if arg == "smoke":  # seconds, not minutes: a small model on a small world, for tests
        small = ModelConfig(
            image=ViTConfig(image_size=32, patch=8, width=32, depth=1, heads=2, pool="mean"),
            text=TextConfig(vocab_size=512, max_len=32, width=32, depth=1, heads=2),
            embed_dim=32,
        )
        config = dataclasses.replace(
            config, model=small, data=DataConfig(source="shapes:n=256,n_val=64,n_test=64,size=32", image_size=32,
                                                 vocab_size=512, max_len=32),
            steps=6, batch_size=16, log_every=1, eval_every=3, checkpoint_every=3, eval_batch_size=32,
        )  # fmt: skip
    elif arg is not None:
        raise ValueError(f"configs/shapes_tiny.py knows the variant 'smoke', not {arg!r}")
    return config
