"""Retrieval metrics over a similarity matrix, with the multi-caption protocol (several captions per image).

text->image: each caption is a query; its one correct image is `caption_to_image[c]`.
image->text: each image is a query; it is right at rank r when its best-ranked caption is at rank r.
"""

from __future__ import annotations

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
