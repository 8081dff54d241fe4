"""Evaluators used during training and by `jaxmr eval`."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from jaxmr.data import DataError, Source, caption_table
from jaxmr.data.eval_batches import EvalStats, eval_caption_batches, eval_image_batches
from jaxmr.metrics import retrieval_metrics
from jaxmr.text import Tokenizer
from jaxmr.training.step import Trainable

# ---------------------------------------------------------------------------------------------- evaluation


class Evaluator:
    """Recall@K both ways on a captioned split, with every caption of every image (big_vision style: pure
    metrics in `jaxmr.metrics`, this class only embeds).

    `image_fn` / `text_fn` name the DualEncoder methods that embed ("image_tower_features" / "text_tower" give
    the towers' raw features, which is how LiT caches them)."""

    def __init__(self, source: Source, tokenizer: Tokenizer, trainable: Trainable, batch_size: int,
                 image_fn: str = "encode_image", text_fn: str = "encode_text"):  # fmt: skip
        self.source, self.tokenizer, self.batch_size = source, tokenizer, batch_size
        self.sharding = trainable.batch_sharding
        self.image_size = trainable.config.data.image_size
        self.trim_padding = trainable.config.model.text.padding_is_inert
        graphdef, replicated = trainable.graphdef, NamedSharding(trainable.mesh, P())
        in_shardings = (trainable.state_shardings.params, self.sharding)
        self.encode_image = jax.jit(lambda p, x: getattr(nnx.merge(graphdef, p), image_fn)(x),
                                    in_shardings=in_shardings, out_shardings=replicated)  # fmt: skip
        self.encode_text = jax.jit(lambda p, x: getattr(nnx.merge(graphdef, p), text_fn)(x),
                                   in_shardings=in_shardings, out_shardings=replicated)  # fmt: skip
        self.texts, self.owners = caption_table(source)
        if not self.texts:
            raise DataError(f"{source.name}: evaluation needs captions")

    def embed_images(
        self, params: dict, progress: bool = False, stats: EvalStats | None = None, view: int = 0,
        crop_scale: tuple[float, float] = (1.0, 1.0), seed: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """(zimg [N, E], valid bool [N]) for every image, plain (view 0) or an augmented view."""

        chunks, valid = [], np.zeros(len(self.source), bool)
        images = eval_image_batches(self.source, self.image_size, self.batch_size, stats=stats, view=view,
                                    crop_scale=crop_scale, seed=seed)  # fmt: skip
        total = -(-len(self.source) // self.batch_size)
        label = "images" if view == 0 else f"image view {view}"
        for batch in tqdm(images, total=total, desc=label, unit="batch", disable=not progress, leave=False):
            z = np.asarray(self.encode_image(params, jax.device_put(batch["image"], self.sharding)))
            chunks.append((batch["index"][batch["mask"]], z[batch["mask"]]))
            valid[batch["index"][batch["mask"]]] = True
        dim = chunks[0][1].shape[1] if chunks else 0
        zimg = np.zeros((len(self.source), dim), np.float32)
        for index, z in chunks:
            zimg[index] = z
        return zimg, valid

    def embed(self, params: dict, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, EvalStats]:
        """(zimg [N, E], ztxt [C, E], valid bool [N], stats)."""

        stats = EvalStats()
        zimg, valid = self.embed_images(params, progress=progress, stats=stats)
        # Captions shortest first, each batch cut to its longest caption (rounded up to 16 tokens) where the text
        # tower ignores padding: the features are the same and short captions cost less.
        order = np.argsort([len(t) for t in self.texts], kind="stable")
        batches = eval_caption_batches([self.texts[i] for i in order], self.owners[order], self.tokenizer,
                                       self.batch_size, stats=stats)  # fmt: skip
        total = -(-len(self.texts) // self.batch_size)
        ztxt = []
        for batch in tqdm(batches, total=total, desc="captions", unit="batch", disable=not progress, leave=False):
            tokens = batch["text"]
            if self.trim_padding:
                longest = int((tokens != self.tokenizer.pad_id).sum(1).max())
                tokens = tokens[:, : min(-(-longest // 16) * 16, tokens.shape[1])]
            z = np.asarray(self.encode_text(params, jax.device_put(tokens, self.sharding)))
            ztxt.append(z[batch["mask"]])
        ztxt = np.concatenate(ztxt)[np.argsort(order)]
        return zimg, ztxt, valid, stats

    def __call__(self, params: dict) -> dict[str, float]:
        zimg, ztxt, valid, stats = self.embed(params)
        keep = valid[self.owners]  # captions of unreadable images cannot be scored
        new_index = np.cumsum(valid) - 1
        metrics = retrieval_metrics(zimg[valid], ztxt[keep], new_index[self.owners[keep]])
        metrics["unreadable_images"] = len(stats.unreadable_images)
        return metrics
