"""One evaluator protocol for every kind of evaluation, in training and in `jaxmr eval`.

An evaluator holds its data and is called with an `Embedder`, which is all it asks of a model:

    Retrieval(source)(embedder)        R@1/5/10 both ways and median ranks, every caption of every image
    ClassPrecision(source)(embedder)   class-name precision@10/100 and zero-shot top-1/5 on a labelled set
    Composed(triplets)(embedder)       composed-query R@K (the composer, the reference image alone, image + text)

Each returns a flat dict of scalars (what metrics.jsonl and TensorBoard log); `ClassPrecision.report` also gives
the per-class table. The model side: `EncoderEmbedder` wraps a serving `Encoder` (a model export, or a run's
checkpoint); the trainer embeds with the parameters being trained (`jaxmr.training.evaluators`), LiT and the
composed trainer from their cached features. A config names its evaluators (`TrainConfig.evaluators`, parsed
by `parse_evaluator`): the pure metrics are in `jaxmr.metrics`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from jaxmr.data import DataError, Source, caption_table, parse_source
from jaxmr.data.images import ImageReadError
from jaxmr.data.records import has_labels
from jaxmr.data.triplets import TripletSource, parse_triplets, triplet_rows
from jaxmr.encoder import Encoder
from jaxmr.metrics import (
    TEMPLATES,
    class_embeddings,
    class_precision_at_k,
    composed_recall,
    label_matrix,
    retrieval_metrics,
    zero_shot,
)
from jaxmr.models import l2_normalize

log = logging.getLogger(__name__)
KS = (10, 100)


class Images(Protocol):
    """What an embedder reads images from: a `Source`, or a triplet set's gallery (`Gallery`)."""

    name: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class Embedder(Protocol):
    """What an evaluator asks of a model: L2-normalised embeddings in the shared space."""

    def embed_images(self, images: Images, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(zimg float32 [N, E], valid bool [N]) for every image; unreadable ones are invalid (zero rows)."""
        ...

    def embed_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """float32 [C, E] for C texts."""
        ...

    def compose(self, zref: np.ndarray, texts: Sequence[str]) -> np.ndarray | None:
        """Composed queries [N, E] from reference embeddings [N, E] and N sentences; None without a composer."""
        ...


class Evaluator(Protocol):
    name: str

    def __call__(self, embedder: Embedder) -> dict[str, float]: ...


# ------------------------------------------------------------------------------------------- evaluators


@dataclasses.dataclass
class Retrieval:
    """Recall@K both ways on a captioned split, with every caption of every image (big_vision style)."""

    source: Source
    name: str = "retrieval"

    def __post_init__(self) -> None:
        self.texts, self.owners = caption_table(self.source)
        if not self.texts:
            raise DataError(f"{self.source.name}: retrieval evaluation needs captions")

    def __call__(self, embedder: Embedder, progress: bool = False) -> dict[str, float]:
        zimg, valid = embedder.embed_images(self.source, progress)
        ztxt = embedder.embed_texts(self.texts, progress)
        keep = valid[self.owners]  # captions of unreadable images cannot be scored
        new_index = np.cumsum(valid) - 1
        metrics = retrieval_metrics(zimg[valid], ztxt[keep], new_index[self.owners[keep]])
        metrics["unreadable_images"] = int((~valid).sum())
        return metrics


@dataclasses.dataclass
class ClassPrecision:
    """Class-name precision@K and zero-shot accuracy on a labelled source. `templates`: the prompts; by default the
    source's own (`source.templates`: the shapes world has some) or `jaxmr.metrics.TEMPLATES`."""

    source: Source
    templates: tuple[str, ...] | None = None
    ks: tuple[int, ...] = KS
    name: str = "classes"

    def __post_init__(self) -> None:
        if not has_labels(self.source):
            raise DataError(f"{self.source.name} has no class labels (use labelled:DIR, a TFDS classification set "
                            "or shapes)")  # fmt: skip
        self.templates = tuple(self.templates or getattr(self.source, "templates", None) or TEMPLATES)

    def report(self, embedder: Embedder, zimg: np.ndarray | None = None, progress: bool = False) -> dict[str, Any]:
        """The whole report: means, chance levels and a per-class table (`zimg` when the images are embedded)."""
        source, ks = self.source, self.ks
        if zimg is None:
            zimg, valid = embedder.embed_images(source, progress)
            if not valid.all():
                raise ImageReadError(f"{source.name}: record {int(np.argmin(valid))} is not a readable image")
        classes = list(source.classes)
        labels = label_matrix([source.labels(i) for i in range(len(source))], len(classes))
        zclass = class_embeddings(embedder.embed_texts, classes, self.templates)
        precision = class_precision_at_k(zclass @ zimg.T, labels.T, ks)
        shot = zero_shot(zimg @ zclass.T, labels)
        rows = [
            {"class": name, "images": int(labels[:, c].sum()),
             **{f"p@{k}": float(precision[f"p@{k}"][c]) for k in ks},
             "zero_shot_precision": float(shot["precision"][c]), "zero_shot_recall": float(shot["recall"][c])}
            for c, name in enumerate(classes)
        ]  # fmt: skip
        return {
            "source": source.name, "n_images": len(source), "n_classes": len(classes),
            "templates": list(self.templates),
            **{f"mean_p@{k}": float(precision[f"p@{k}"].mean()) for k in ks},
            "zero_shot_top1": shot["top1"], "zero_shot_top5": shot["top5"],
            # what a random ranking / a random guess scores: the share of images showing the class, per class
            # mean; the expected top-1 accuracy of a uniformly random class
            "chance_precision": float(labels.mean()), "chance_top1": float(labels.sum(axis=1).mean() / len(classes)),
            "per_class": rows,
        }  # fmt: skip

    def __call__(self, embedder: Embedder, progress: bool = False) -> dict[str, float]:
        report = self.report(embedder, progress=progress)
        keys = (*(f"mean_p@{k}" for k in self.ks), "zero_shot_top1", "zero_shot_top5", "chance_precision")
        return {k: float(report[k]) for k in keys}


@dataclasses.dataclass
class Gallery:
    """A triplet set's gallery as images an embedder reads (record g holds gallery image g)."""

    triplets: TripletSource

    @property
    def name(self) -> str:
        return f"{self.triplets.name} gallery"

    def __len__(self) -> int:
        return self.triplets.gallery_size()

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.triplets.gallery_image(index), "id": str(index), "captions": []}


QUERIES = ("composed", "image_only", "image_plus_text")


@dataclasses.dataclass
class Composed:
    """Composed queries on a triplet split: the whole gallery ranked (the reference left out) for the trained
    composer (when the embedder has one), the reference image alone, and the normalised sum of the reference
    image and the embedded sentence (what the server does without a composer). Flat keys `<query>_r1`, ..."""

    triplets: TripletSource
    rows: tuple[np.ndarray, np.ndarray, list[str]] | None = None  # `triplet_rows(triplets)` when already read
    name: str = "composed"

    def __post_init__(self) -> None:
        self.references, self.targets, self.texts = self.rows or triplet_rows(self.triplets)

    def __call__(self, embedder: Embedder, progress: bool = False) -> dict[str, float]:
        gallery, valid = embedder.embed_images(Gallery(self.triplets), progress)
        if not valid.all():
            raise ImageReadError(f"{self.triplets.name}: gallery image {int(np.argmin(valid))} is unreadable")
        reference = gallery[self.references]
        summed = reference + embedder.embed_texts(self.texts, progress)
        queries = {"image_only": reference, "image_plus_text": np.asarray(l2_normalize(summed))}
        composed = embedder.compose(reference, self.texts)
        if composed is not None:
            queries = {"composed": composed, **queries}
        metrics: dict[str, float] = {}
        for name, q in queries.items():
            for key, value in composed_recall(q, gallery, self.references, self.targets).items():
                metrics[key if key.startswith("n_") else f"{name}_{key}"] = value
        return metrics


EVALUATORS = {"retrieval": Retrieval, "classes": ClassPrecision, "composed": Composed}


def parse_evaluator(spec: str, default_source: str, split: str) -> Evaluator:
    """`retrieval`, `classes`, `composed` on the run's own source and eval split, or `NAME@SOURCE_SPEC` on
    another (`classes@labelled:/data/pets`, `retrieval@captions:/data/flickr8k`; its `split` is used too)."""
    name, _, source_spec = spec.partition("@")
    if name not in EVALUATORS:
        raise ValueError(f"unknown evaluator {name!r} in {spec!r}; evaluators: {', '.join(EVALUATORS)}")
    if name == "composed":
        return Composed(parse_triplets(source_spec or default_source, split))
    return EVALUATORS[name](parse_source(source_spec or default_source, split))


# -------------------------------------------------------------------------------------------- embedders


class EncoderEmbedder:
    """A serving `Encoder` as an `Embedder` (`jaxmr eval`, reports): images preprocessed on the host in batches."""

    def __init__(self, encoder: Encoder, batch_size: int = 256):
        self.encoder, self.batch_size = encoder, batch_size

    def embed_images(self, images: Images, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        return embed_images(self.encoder, images, self.batch_size, progress)

    def embed_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.encoder.embed_dim), np.float32)
        chunks = [self.encoder.encode_texts(texts[i : i + 1024]) for i in range(0, len(texts), 1024)]
        return np.concatenate(chunks)

    def compose(self, zref: np.ndarray, texts: Sequence[str]) -> np.ndarray | None:
        return self.encoder.compose(zref, texts) if self.encoder.has_composer else None


def embed_images(encoder: Encoder, images: Images, batch: int = 256, progress: bool = False,
                 strict: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(zimg float32 [N, E], valid bool [N]) of every image, `batch` at a time: the one host-side embedding loop.
    An unreadable image is logged and left invalid (a zero row), or with `strict` an error naming it."""
    out = np.zeros((len(images), encoder.embed_dim), np.float32)
    valid = np.zeros(len(images), bool)
    bar = tqdm(total=len(images), desc=f"embedding {images.name}", unit="img", disable=not progress, leave=False)
    for start in range(0, len(images), batch):
        rows, pixels = [], []
        for i in range(start, min(start + batch, len(images))):
            try:
                pixels.append(encoder.preprocess(images[i]["image"]))
                rows.append(i)
            except ImageReadError as e:
                if strict:
                    raise ImageReadError(f"{images.name}: record {i}: {e}") from None
                log.warning("%s: record %d: %s", images.name, i, e)
        if pixels:
            out[rows] = encoder.encode_images(np.stack(pixels))
            valid[rows] = True
        bar.update(min(batch, len(images) - start))
    bar.close()
    return out, valid
