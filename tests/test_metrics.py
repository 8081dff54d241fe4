import numpy as np
import pytest

from jaxmr.metrics import retrieval_metrics


def test_recall_by_hand():
    # 3 images, 5 captions: captions 0,1 -> image 0; 2 -> image 1; 3,4 -> image 2 (one-hot-ish embeddings)
    zimg = np.eye(3, dtype=np.float32)
    ztxt = np.array([[1, 0, 0], [0, 1, 0.1], [0, 1, 0], [0, 0, 1], [1, 0.5, 0]], np.float32)
    owners = np.array([0, 0, 1, 2, 2])
    m = retrieval_metrics(zimg, ztxt, owners, ks=(1, 2))
    # t2i ranks: c0 -> img0 first (0); c1 -> img1 first, img2 .1, img0 0 -> rank 2; c2 -> 0; c3 -> 0;
    # c4 -> img0 1, img1 .5, img2 0 -> rank 2
    assert m["t2i_r1"] == pytest.approx(3 / 5) and m["t2i_r2"] == pytest.approx(3 / 5)
    assert m["t2i_median_rank"] == 1.0
    # i2t: img0 best own caption c0 (1.0), c4 also 1.0: ties are not counted against -> rank 0
    # img1: own c2 = 1.0, c1 = 1.0 (not own) ties -> rank 0; img2: own c3 = 1.0 -> rank 0
    assert m["i2t_r1"] == 1.0 and (m["n_images"], m["n_captions"]) == (3, 5)


def test_perfect_and_chunked():
    rng = np.random.default_rng(0)
    zimg = rng.normal(size=(50, 8)).astype(np.float32)
    zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
    owners = np.repeat(np.arange(50), 5)
    ztxt = zimg[owners] + 0.01 * rng.normal(size=(250, 8)).astype(np.float32)
    assert retrieval_metrics(zimg, ztxt, owners)["t2i_r1"] == 1.0
    noisy = zimg[owners] + 2.0 * rng.normal(size=(250, 8)).astype(np.float32)
    assert retrieval_metrics(zimg, noisy, owners) == retrieval_metrics(zimg, noisy, owners, chunk=7)


def test_bad_shapes():
    with pytest.raises(ValueError, match="caption_to_image must be"):
        retrieval_metrics(np.zeros((2, 3)), np.zeros((4, 3)), np.zeros(3, int))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(np.zeros((2, 3)), np.zeros((1, 3)), np.array([2]))
