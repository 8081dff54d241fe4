"""The UI's views of the embeddings: k-means groups for the result graph and a 2-D projection (t-SNE)."""

from __future__ import annotations

import numpy as np


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
