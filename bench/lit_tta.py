"""Test-time flip averaging on a trained run: dev recall with each image embedded as it is, and as the normalised
mean of its embedding and its horizontal flip's (the cheap, standard test-time augmentation).

    python -m bench.lit_tta runs/lit_ablation/base [RUN ...]

Both are measured end to end (images and captions through the towers and heads, as `jaxmr eval` does) on the
run's own eval split. Results: bench/results/lit_tta-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from bench.common import write_results
from jaxmr.data import parse_source
from jaxmr.data.eval_batches import eval_image_batches
from jaxmr.evaluators import Retrieval
from jaxmr.training.evaluators import TrainEmbedder
from jaxmr.training.runs import load_run

KEYS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5")


class FlipEmbedder(TrainEmbedder):
    """Each image's embedding averaged with its horizontal flip's (both normalised, then the mean normalised)."""

    def embed_images(self, images, progress: bool = False, **_) -> tuple[np.ndarray, np.ndarray]:
        zimg, valid = None, np.zeros(len(images), bool)
        for batch in eval_image_batches(images, self.image_size, self.batch_size):
            both = [np.asarray(self.encode_image(self.params, jax.device_put(np.ascontiguousarray(x), self.sharding)))
                    for x in (batch["image"], batch["image"][:, :, ::-1])]  # fmt: skip
            z = sum(b / np.linalg.norm(b, axis=1, keepdims=True) for b in both)
            z /= np.linalg.norm(z, axis=1, keepdims=True)
            zimg = np.zeros((len(images), z.shape[1]), np.float32) if zimg is None else zimg
            keep = batch["mask"]
            zimg[batch["index"][keep]], valid[batch["index"][keep]] = z[keep], True
        return zimg, valid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    records = []
    for workdir in args.runs:
        config, trainable, state, tokenizer = load_run(workdir)
        source = parse_source(config.data.source, config.data.eval_split)
        for name, cls in (("plain", TrainEmbedder), ("flip average", FlipEmbedder)):
            start = time.perf_counter()
            with jax.set_mesh(trainable.mesh):
                metrics = Retrieval(source)(cls(trainable, tokenizer, state.params))
            records.append({"run": workdir, "images": name, **{k: round(metrics[k], 4) for k in KEYS},
                            "eval_s": round(time.perf_counter() - start)})  # fmt: skip
            print(records[-1], flush=True)
    notes = (
        f"`python -m bench.lit_tta {' '.join(args.runs)}`: each run's eval split end to end; `flip average` "
        "embeds every image twice (itself and mirrored), so it costs twice the image tower at index time."
    )
    path = write_results("lit_tta", records, ["run", "images", *KEYS, "eval_s"], "Test-time flip averaging", notes,
                         args.out)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
