"""Composed queries on the shapes world: a reference image + "make the circle blue" -> the edited image.

    jaxmr train --config configs/shapes_tiny.py --workdir runs/shapes_tiny          # the base model, first
    jaxmr train --config configs/shapes_composed.py --workdir runs/shapes_composed
    jaxmr eval --workdir runs/shapes_composed --split test
    jaxmr index build --workdir runs/shapes_composed --source shapes --out runs/index  # serves composed queries

`base=DIR` picks another trained dual encoder (a run or an export), `data=triplets:DIR` your own triplets.
`get_config("smoke")` is a seconds-long variant for tests.
"""

import dataclasses

from jaxmr.config import ComposedConfig


def get_config(arg: str | None = None) -> ComposedConfig:
    config = ComposedConfig(
        base="runs/shapes_tiny",
        data="shapes-edits:n=20000,size=48,seed=0",
        batch_size=256,
        steps=1500,
        eval_every=500,
    )
    if arg == "smoke":
        config = dataclasses.replace(config, data="shapes-edits:n=512,n_val=64,n_test=64,size=32", batch_size=32,
                                     steps=6, log_every=2, eval_every=3)  # fmt: skip
    elif arg is not None:
        raise ValueError(f"configs/shapes_composed.py knows the variant 'smoke', not {arg!r}")
    return config
