"""Retrieval metrics over a similarity matrix, with the multi-caption protocol (several captions per image).

text->image: each caption is a query; its one correct image is `caption_to_image[c]`.
image->text: each image is a query; it is right at rank r when its best-ranked caption is at rank r.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KS = (1, 5, 10)


def _ranks_t2i(similarity: np.ndarray, caption_to_image: np.ndarray) -> np.ndarray:
    """0-based rank of the correct image for every caption. similarity: [C, N]."""
    correct = similarity[np.arange(len(caption_to_image)), caption_to_image]
    return (similarity > correct[:, None]).sum(axis=1)


def _ranks_i2t(similarity: np.ndarray, caption_to_image: np.ndarray, first_image: int = 0) -> np.ndarray:
    """0-based rank of each image's best caption. similarity: [n, C] for images first_image ... first_image+n."""
    images = first_image + np.arange(similarity.shape[0])
    owns = caption_to_image[None, :] == images[:, None]  # [n, C]
    best_own = np.where(owns, similarity, -np.inf).max(axis=1)
    return (np.where(owns, -np.inf, similarity) > best_own[:, None]).sum(axis=1)


def retrieval_metrics(
    zimg: np.ndarray, ztxt: np.ndarray, caption_to_image: np.ndarray, ks=KS, chunk: int = 4096
) -> dict[str, float]:
    """Recall@K both ways and median ranks (1-based).

    zimg: [N, E] image embeddings; ztxt: [C, E] caption embeddings; caption_to_image: int [C] in [0, N).
    Images with no caption are left out of image->text (they cannot be right). Captions are scored in chunks
    so that memory stays O(chunk * N).
    """
    zimg, ztxt = np.asarray(zimg, np.float32), np.asarray(ztxt, np.float32)
    caption_to_image = np.asarray(caption_to_image, np.int64)
    if zimg.ndim != 2 or ztxt.ndim != 2 or zimg.shape[1] != ztxt.shape[1]:
        raise ValueError(f"zimg must be [N, E] and ztxt [C, E]; got {zimg.shape} and {ztxt.shape}")
    if caption_to_image.shape != (len(ztxt),):
        raise ValueError(f"caption_to_image must be [C] = [{len(ztxt)}], got {caption_to_image.shape}")
    if len(ztxt) and (caption_to_image.min() < 0 or caption_to_image.max() >= len(zimg)):
        raise ValueError("caption_to_image holds an index outside [0, N)")
    t2i = np.concatenate(
        [_ranks_t2i(ztxt[s : s + chunk] @ zimg.T, caption_to_image[s : s + chunk]) for s in range(0, len(ztxt), chunk)]
    )
    has_caption = np.bincount(caption_to_image, minlength=len(zimg)) > 0
    i2t = np.concatenate(
        [_ranks_i2t(zimg[s : s + chunk] @ ztxt.T, caption_to_image, s) for s in range(0, len(zimg), chunk)]
    )[has_caption]
    metrics = {}
    for k in ks:
        metrics[f"t2i_r{k}"] = float(np.mean(t2i < k))
        metrics[f"i2t_r{k}"] = float(np.mean(i2t < k))
    metrics["t2i_median_rank"] = float(np.median(t2i) + 1)
    metrics["i2t_median_rank"] = float(np.median(i2t) + 1)
    metrics["n_images"] = len(zimg)
    metrics["n_captions"] = len(ztxt)
    return metrics


def composed_recall(
    queries: np.ndarray, gallery: np.ndarray, references: np.ndarray, targets: np.ndarray, ks=KS, chunk: int = 4096
) -> dict[str, float]:
    """Recall@K of composed queries (CIRR protocol): each query ranks the whole gallery except its own reference.

    queries: [Q, E]; gallery: [G, E]; references, targets: int [Q] gallery rows. Returns r1, r5, r10 (fractions)
    and the median rank (1-based); ties count against the target.
    """
    queries, gallery = np.asarray(queries, np.float32), np.asarray(gallery, np.float32)
    references, targets = np.asarray(references, np.int64), np.asarray(targets, np.int64)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries must be [Q, E] and gallery [G, E]; got {queries.shape} and {gallery.shape}")
    if references.shape != (len(queries),) or targets.shape != (len(queries),):
        raise ValueError(f"references and targets must be [Q] = [{len(queries)}]")
    if len(queries) and (
        min(references.min(), targets.min()) < 0 or max(references.max(), targets.max()) >= len(gallery)
    ):
        raise ValueError("a reference or target is outside the gallery")
    ranks = []
    for s in range(0, len(queries), chunk):
        rows = np.arange(min(chunk, len(queries) - s))
        similarity = queries[s : s + chunk] @ gallery.T
        similarity[rows, references[s : s + chunk]] = -np.inf
        correct = similarity[rows, targets[s : s + chunk]]
        ranks.append((similarity >= correct[:, None]).sum(axis=1) - 1)
    rank = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    metrics = {f"r{k}": float(np.mean(rank < k)) for k in ks}
    metrics["median_rank"] = float(np.median(rank) + 1)
    metrics["n_queries"], metrics["n_gallery"] = len(queries), len(gallery)
    return metrics


# ------------------------------------------------------------------------------------- class-labelled sets

# Prompt templates for class names (CLIP-style prompt ensembling: a class's embedding is the normalised mean of
# its prompts' embeddings).
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.", "a photo of the {}.",
             "there is a {}.")  # fmt: skip


def class_prompt(name: str) -> str:
    """A class folder / label name as words: "golden_retriever" -> "golden retriever"."""
    return name.replace("_", " ").strip()


def class_embeddings(encode_texts, classes: list[str], templates: tuple[str, ...] = TEMPLATES) -> np.ndarray:
    """[C, E]: for each class, the L2-normalised mean of `encode_texts` over its prompts (each prompt embedding
    normalised first). `encode_texts(list[str]) -> [n, E]`."""
    if not classes or not templates:
        raise ValueError("class_embeddings needs at least one class and one template")
    prompts = [t.format(class_prompt(c)) for c in classes for t in templates]
    z = np.asarray(encode_texts(prompts), np.float32).reshape(len(classes), len(templates), -1)
    z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    mean = z.mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def label_matrix(labels: list[list[int]], n_classes: int) -> np.ndarray:
    """bool [N, C] from each image's class indices (several for a multi-label image)."""
    out = np.zeros((len(labels), n_classes), bool)
    for i, row in enumerate(labels):
        out[i, row] = True
    return out


def _top(similarity: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best columns of each row, best first (ties: lower index first)."""
    k = min(k, similarity.shape[1])
    part = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(similarity, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)


def class_precision_at_k(similarity: np.ndarray, relevant: np.ndarray, ks=(10, 100)) -> dict[str, np.ndarray]:
    """Text->image precision of class-name queries: similarity [C, N] (class c's query against image n),
    relevant bool [C, N]. Returns {"p@K": float [C]}: the fraction of class c's top min(K, N) images that show c."""
    similarity, relevant = np.asarray(similarity, np.float32), np.asarray(relevant, bool)
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {similarity.shape} and relevant {relevant.shape} differ")
    out = {}
    for k in ks:
        top = _top(similarity, k)
        out[f"p@{k}"] = np.take_along_axis(relevant, top, axis=1).mean(axis=1)
    return out


def zero_shot(similarity: np.ndarray, relevant: np.ndarray, ks=(1, 5)) -> dict[str, Any]:
    """Zero-shot classification: similarity [N, C] (image n against class c's prompts), relevant bool [N, C].

    Returns top-K accuracy ("top1", "top5": an image is right when any of its classes is among its K best) and,
    per class, the precision and recall of the top-1 prediction ("precision", "recall": float [C]; a class
    never predicted has precision nan)."""
    similarity, relevant = np.asarray(similarity, np.float32), np.asarray(relevant, bool)
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {similarity.shape} and relevant {relevant.shape} differ")
    out: dict[str, Any] = {}
    for k in ks:
        out[f"top{k}"] = float(np.take_along_axis(relevant, _top(similarity, k), axis=1).any(axis=1).mean())
    predicted = _top(similarity, 1)[:, 0]
    hit = relevant[np.arange(len(predicted)), predicted]
    n_classes = similarity.shape[1]
    counts = np.bincount(predicted, minlength=n_classes)
    hits = np.bincount(predicted, weights=hit, minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["precision"] = np.where(counts > 0, hits / counts, np.nan)
        right = relevant & (predicted[:, None] == np.arange(n_classes))  # images of class c predicted as c
        out["recall"] = right.sum(axis=0) / np.maximum(relevant.sum(axis=0), 1)
    return out


def precision_recall_curve(scores: np.ndarray, relevant: np.ndarray) -> dict[str, np.ndarray | float]:
    """Micro-averaged precision-recall curve of scored pairs: scores float [M], relevant bool [M] (e.g. every
    caption-image pair of a captioned set). Thresholds run from the highest score down; returns "precision",
    "recall", "threshold" (float [M'], one point per distinct score) and "average_precision" (the mean of the
    precision at each relevant pair's rank, ties broken pessimistically)."""
    scores, relevant = np.asarray(scores, np.float64).reshape(-1), np.asarray(relevant, bool).reshape(-1)
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} differ")
    total = relevant.sum()
    if total == 0:
        raise ValueError("no relevant pairs: the curve is undefined")
    order = np.lexsort((relevant, -scores))  # among equal scores the irrelevant come first: pessimistic
    scores, relevant = scores[order], relevant[order]
    tp = np.cumsum(relevant)
    precision_at = tp / np.arange(1, len(scores) + 1)
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # the last pair of each distinct score
    return {
        "precision": precision_at[last],
        "recall": tp[last] / total,
        "threshold": scores[last],
        "average_precision": float(precision_at[relevant].sum() / total),
    }
