"""The UI's views of the embeddings: k-means groups for the result graph and the map, a 2-D projection (t-SNE),
and a few words that name each group."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

# words that say nothing about what a group of captions shows
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "of",
        "in",
        "on",
        "at",
        "to",
        "with",
        "by",
        "for",
        "from",
        "into",
        "onto",
        "over",
        "under",
        "near",
        "its",
        "his",
        "her",
        "their",
        "is",
        "are",
        "was",
        "were",
        "be",
        "being",
        "been",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "it",
        "he",
        "she",
        "they",
        "them",
        "some",
        "two",
        "three",
        "one",
        "four",
        "several",
        "other",
        "while",
        "as",
        "up",
        "down",
        "out",
        "off",
        "through",
        "front",
        "background",
        "top",
        "side",
        "next",
        "another",
        "each",
        "very",
    ]
)


def kmeans(x: np.ndarray, k: int, iterations: int = 25, seed: int = 0) -> np.ndarray:
    """Cluster labels int [N] of rows of x [N, E] (k-means++ start, Lloyd iterations)."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(x[rng.choice(len(x), p=d / d.sum())] if d.sum() > 0 else x[rng.integers(len(x))])
    centres = np.asarray(centres)
    labels = np.zeros(len(x), np.int64)
    for _ in range(iterations):
        labels = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
        for c in range(k):
            if (labels == c).any():
                centres[c] = x[labels == c].mean(0)
    return labels


def project_2d(vectors: np.ndarray) -> tuple[np.ndarray, str]:
    """float32 [N, E] -> ([N, 2] in [-1, 1], method): t-SNE when there are enough points, else PCA."""
    if len(vectors) >= 10:
        from sklearn.manifold import TSNE  # scikit-learn costs ~1 s to import; only the t-SNE views need it

        xy = TSNE(2, perplexity=min(30.0, (len(vectors) - 1) / 3), init="pca", random_state=0).fit_transform(vectors)
        method = "tsne"
    else:
        centred = vectors - vectors.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T if len(vectors) > 1 else np.zeros((len(vectors), 2))
        xy = np.pad(xy, ((0, 0), (0, max(0, 2 - xy.shape[1]))))
        method = "pca"
    scale = np.abs(xy).max() or 1.0
    return (xy / scale).astype(np.float32), method


def map_clusters(points: int) -> int:
    """How many k-means groups the map colours `points` images in: 8, fewer below 64 images."""
    return int(np.clip(points // 8, 1, 8))


def cluster_words(captions: Sequence[Sequence[str]], labels: np.ndarray, k: int, words: int = 3) -> list[list[str]]:
    """For each of the k groups, the caption words most typical of it: frequent in the group's captions and more
    frequent there than over all of them (count in group x share of its uses that fall in the group).
    captions[i]: image i's captions; labels int [N]: image i's group."""
    tokenise = lambda texts: [w for t in texts for w in set(re.findall(r"[a-z]+", t.lower()))
                              if len(w) > 2 and w not in STOPWORDS]  # fmt: skip
    per_group = [Counter() for _ in range(k)]
    for texts, label in zip(captions, labels, strict=True):
        per_group[int(label)].update(tokenise(texts))
    total = sum(per_group, Counter())
    out = []
    for counts in per_group:
        ranked = sorted(counts, key=lambda w: (-counts[w] * counts[w] / total[w], w))
        out.append([w for w in ranked if counts[w] > 1][:words])
    return out
