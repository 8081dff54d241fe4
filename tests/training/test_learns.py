"""jaxmr.training learns, on the CPU: a fixed batch is memorised, and a short run on the shapes world beats
chance on its test split by a margin derived from chance (the trainer's other tests check equalities only: a step
that never moved the parameters would pass them)."""

import math

import jax.numpy as jnp
import numpy as np

from jaxmr.config import load_config_file
from jaxmr.sharding import make_mesh
from jaxmr.training.runs import evaluate
from jaxmr.training.step import build

from conftest import ROOT

SMOKE = str(ROOT / "configs" / "shapes_tiny.py") + ":smoke"


def test_a_fixed_batch_is_memorised():
    config = load_config_file(SMOKE + ",steps=40,optim.warmup_steps=5")
    trainable = build(config, make_mesh([("data", 1)]))
    rng = np.random.default_rng(0)
    n, size, length = config.batch_size, config.data.image_size, config.data.max_len
    tokens = rng.integers(4, config.model.text.vocab_size, (n, length)).astype(np.int32)
    tokens[:, 12:] = 0
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)),
        "text": jnp.asarray(tokens),
        "index": jnp.arange(n, dtype=jnp.int32),  # n distinct pairs: chance is a loss of ln(n)
    }
    state, losses = trainable.init(), []
    for _ in range(30):
        state, metrics = trainable.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 0.8 * math.log(n), losses[0]  # a fresh model is no better than chance on its first batch
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 30


def test_a_short_shapes_run_beats_chance(learned_run):
    """`learned_run`: 150 steps of batch 32 on a 2,048-image shapes world; test split: 64 images, 5 captions each.

    Chance t->i R@5 is p = 5/64 (i->t: 1 - (315/320)^5, about the same). Counting the 64 images (not the 320
    captions, which share their image) as the independent trials, a model at chance scores p +- sqrt(p (1 - p) /
    64) = 0.078 +- 0.034: the bar is chance plus 4 such deviations (0.21); this run reaches about twice that."""
    result = evaluate(learned_run, split="test")
    images = result["n_images"]
    assert images == 64 and result["n_captions"] == 320
    for direction in ("t2i", "i2t"):
        chance = 5 / images
        bar = chance + 4 * math.sqrt(chance * (1 - chance) / images)
        assert result[f"{direction}_r5"] > bar, (direction, result)
    assert result["t2i_median_rank"] < images / 4  # chance's median rank is about images / 2
