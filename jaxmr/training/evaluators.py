"""The model being trained as an `Embedder` (`jaxmr.evaluators`), and the configured evaluators of a run.

Training evaluates with the same evaluators as `jaxmr eval` (retrieval, class precision, composed queries);
only the embedding differs: here it runs jitted over the run's mesh with the parameters being trained.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from jaxmr.config import TrainConfig
from jaxmr.data.eval_batches import EvalStats, eval_caption_batches, eval_image_batches
from jaxmr.evaluators import Evaluator, Images, parse_evaluator
from jaxmr.text import Tokenizer, cut_padding
from jaxmr.training.step import Trainable


class TrainEmbedder:
    """Embeds with a trainable's jitted encoders and a given set of parameters (`with_params` shares the compiled
    functions between evaluations).

    `image_fn` / `text_fn` name the DualEncoder methods that embed ("image_tower_features" / "text_tower" give
    the towers' raw features, which is how LiT caches them)."""

    def __init__(self, trainable: Trainable, tokenizer: Tokenizer, params: dict | None = None,
                 image_fn: str = "encode_image", text_fn: str = "encode_text"):  # fmt: skip
        self.tokenizer, self.params, self.batch_size = tokenizer, params, trainable.config.eval_batch_size
        self.sharding = trainable.batch_sharding
        self.image_size = trainable.config.data.image_size
        self.trim_padding = trainable.config.model.text.padding_is_inert
        graphdef, replicated = trainable.graphdef, NamedSharding(trainable.mesh, P())
        in_shardings = (trainable.state_shardings.params, self.sharding)
        self.encode_image = jax.jit(lambda p, x: getattr(nnx.merge(graphdef, p), image_fn)(x),
                                    in_shardings=in_shardings, out_shardings=replicated)  # fmt: skip
        self.encode_text = jax.jit(lambda p, x: getattr(nnx.merge(graphdef, p), text_fn)(x),
                                   in_shardings=in_shardings, out_shardings=replicated)  # fmt: skip

    def with_params(self, params: dict) -> TrainEmbedder:
        clone = copy.copy(self)  # the compiled encoders are shared
        clone.params = params
        return clone

    def embed_images(
        self, images: Images, progress: bool = False, stats: EvalStats | None = None, view: int = 0,
        crop_scale: tuple[float, float] = (1.0, 1.0), seed: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """(zimg [N, E], valid bool [N]) for every image, plain (view 0) or an augmented view."""
        chunks, valid = [], np.zeros(len(images), bool)
        batches = eval_image_batches(images, self.image_size, self.batch_size, stats=stats, view=view,
                                     crop_scale=crop_scale, seed=seed)  # fmt: skip
        total = -(-len(images) // self.batch_size)
        label = "images" if view == 0 else f"image view {view}"
        for batch in tqdm(batches, total=total, desc=label, unit="batch", disable=not progress, leave=False):
            z = np.asarray(self.encode_image(self.params, jax.device_put(batch["image"], self.sharding)))
            chunks.append((batch["index"][batch["mask"]], z[batch["mask"]]))
            valid[batch["index"][batch["mask"]]] = True
        dim = chunks[0][1].shape[1] if chunks else 0
        zimg = np.zeros((len(images), dim), np.float32)
        for index, z in chunks:
            zimg[index] = z
        return zimg, valid

    def embed_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """[C, E]. Captions go shortest first, each batch cut to its longest caption (rounded up to 8 tokens)
        where the text tower ignores padding: the features are the same and short captions cost less."""
        texts = list(texts)
        order = np.argsort([len(t) for t in texts], kind="stable")
        batches = eval_caption_batches([texts[i] for i in order], np.zeros(len(texts), np.int32), self.tokenizer,
                                       self.batch_size)  # fmt: skip
        total = -(-len(texts) // self.batch_size)
        ztxt = []
        for batch in tqdm(batches, total=total, desc="captions", unit="batch", disable=not progress, leave=False):
            tokens = batch["text"]
            if self.trim_padding:  # to a multiple of 8 tokens: an MPNet's captions cost 20 % less than at 16
                tokens = cut_padding(tokens, self.tokenizer.pad_id, range(8, tokens.shape[1], 8))
            z = np.asarray(self.encode_text(self.params, jax.device_put(tokens, self.sharding)))
            ztxt.append(z[batch["mask"]])
        return np.concatenate(ztxt)[np.argsort(order)]

    def compose(self, zref: np.ndarray, texts: Sequence[str]) -> None:
        return None  # a dual encoder has no composer


class RunEvaluation:
    """The evaluators a config names (`TrainConfig.evaluators`), called with the parameters being trained.

    The first one's metrics are logged as they are (eval/t2i_r1 ...), the others' under their name
    (eval/classes/mean_p@10 ...). `first_embedder` may replace the end-to-end embedder for the first evaluator
    (LiT evaluates its heads on cached tower features)."""

    def __init__(self, config: TrainConfig, embedder: TrainEmbedder,
                 first_embedder: Callable[[dict], object] | None = None):  # fmt: skip
        data = config.data
        self.evaluators: list[Evaluator] = [parse_evaluator(s, data.source, data.eval_split) for s in config.evaluators]
        self.embedder, self.first_embedder = embedder, first_embedder

    def __call__(self, params: dict) -> dict[str, float]:
        first, *others = self.evaluators
        metrics = first((self.first_embedder or self.embedder.with_params)(params))
        for evaluator in others:
            values = evaluator(self.embedder.with_params(params))
            metrics.update({f"{evaluator.name}/{k}": v for k, v in values.items()})
        return metrics
