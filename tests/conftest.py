"""Shared fixtures. Sharded paths run on 8 fake CPU devices, set before jax is first imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One full-suite run hung inside tokenizers' BPE training (its rayon pool) after earlier tests had forked grain
# workers and run threaded encoders in this process; the tests' tokenizers are tiny, so run them sequentially.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Generated data (the shapes cache, MPNet's unpacked weights: 438 MB) goes to a fresh folder per test session, not
# the user's ~/.cache, and is removed when the session ends.
if "JAXMR_CACHE" not in os.environ:
    os.environ["JAXMR_CACHE"] = __import__("tempfile").mkdtemp(prefix="jaxmr-test-cache-")
    __import__("atexit").register(__import__("shutil").rmtree, os.environ["JAXMR_CACHE"], ignore_errors=True)
# The tests' subprocesses (training runs, servers, the two-process runs) compile the same tiny programs again and
# again: one XLA cache per session, empty at its start, shared with them (-27 % on the training tests' file).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["JAXMR_CACHE"], "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the repository
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    if not (FLICKR8K / "captions.tsv").exists():
        pytest.skip(f"Flickr8k not found at {FLICKR8K}")
    return FLICKR8K


def write_image(path: Path, value: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[..., 0] = value
    pixels[:, : size[0] // 2, 1] = 255 - value  # left half differs from right half: flips would show
    Image.fromarray(pixels).save(path)


@pytest.fixture
def tsv_folder(tmp_path: Path) -> Path:
    """A caption folder like ../shared/data/flickr8k: images/ and captions.tsv (image, split, caption)."""
    lines = ["image\tsplit\tcaption"]
    for i in range(12):
        write_image(tmp_path / "images" / f"img{i}.jpg", 20 * i)
        split = "train" if i < 8 else "dev" if i < 10 else "test"
        lines += [f"img{i}.jpg\t{split}\tpicture number {i} caption {k}" for k in range(3)]
    (tmp_path / "captions.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path


SMOKE_SOURCE = "shapes:n=256,n_val=64,n_test=64,size=32"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """A few-step training run of configs/shapes_tiny.py:smoke (a real checkpoint, tokenizer and config)."""
    from jaxmr.config import load_config_file
    from jaxmr.training.loop import train

    workdir = tmp_path_factory.mktemp("smoke_run")
    config = load_config_file(str(ROOT / "configs" / "shapes_tiny.py:smoke"))
    train(config, workdir, progress=False)
    return workdir


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory) -> Path:
    """A short run that learns: configs/shapes_tiny.py:smoke for 150 steps of batch 32 on a 2,048-image world
    (~25 s on 2 cores); its test split has 64 images with 5 captions each."""
    import dataclasses

    from jaxmr.config import load_config_file
    from jaxmr.training.loop import train

    config = load_config_file(str(ROOT / "configs" / "shapes_tiny.py:smoke"))
    config = dataclasses.replace(
        config, steps=150, batch_size=32, eval_every=150, checkpoint_every=150, log_every=25,
        data=dataclasses.replace(config.data, source="shapes:n=2048,n_val=64,n_test=64,size=32"),
        optim=dataclasses.replace(config.optim, warmup_steps=10),
    )  # fmt: skip
    workdir = tmp_path_factory.mktemp("learned_run")
    train(config, workdir, progress=False)
    return workdir


def wait_ready(get, timeout: float = 120) -> None:
    """Polls a server's /readyz (through `get`, a test client's or a requests-like function) until it is 200."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if get("/readyz").status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError("the server did not become ready")


def assert_close_in_norm(want, got, rel: float = 2e-5, floor: float = 1e-6) -> None:
    """Every leaf of `got` within `rel` of `want` in relative Frobenius norm, up to an absolute floor of
    `floor` times the whole tree's norm.

    Two float32 computations of the same sums in another order (GradCache vs the full batch, 8 devices vs 1)
    differ by ~1e-7 relative per addition, relative to the sum of the terms' magnitudes: an element whose terms
    cancel can differ by 4e-4 relative to itself (seen on a fresh clone), while a leaf's norm keeps the ~1e-6
    error of the arithmetic. Leaves whose gradient is zero in exact arithmetic (a bias before a LayerNorm) hold
    only rounding noise, ~1e-9 here: the floor covers them. A wrong gradient (a missing term, a wrong repeat) is
    off by O(1) of a leaf's norm and fails."""
    import jax

    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
             for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True)]  # fmt: skip
    total = np.sqrt(sum(np.sum(a * a) for a, _ in pairs))
    for a, b in pairs:
        assert a.shape == b.shape
        error, bound = np.linalg.norm(a - b), rel * np.linalg.norm(a) + floor * total
        assert error <= bound, f"error {error:.3e} over {bound:.3e} (leaf norm {np.linalg.norm(a):.3e})"


# ----------------------------------------------------- webdataset shards (tests/data, tests/training)

COLOURS = ["red", "green", "blue", "white", "yellow", "purple"]


def jpeg(value: int) -> bytes:
    pixels = np.full((24, 32, 3), value, np.uint8)
    pixels[:, :16, 1] = 255 - value
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, shards: int = 3, per_shard: int = 20) -> dict:
    """img2dataset-like shards 00000.tar ...: jpg + txt + json per sample; in shard 0 one sample whose jpg does
    not decode, one with its caption only in the json, one with no caption, one with no image; the last shard
    cut off in the middle of a member. Returns what a reader should find."""
    folder.mkdir(parents=True, exist_ok=True)
    good, n = [], 0
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                caption = f"a {COLOURS[n % 6]} square number {n}"
                meta = {"url": f"http://example.com/{key}.jpg", "width": 32}
                if s == 0 and i == 1:
                    add(tar, f"{key}.jpg", b"not a jpeg at all")
                    add(tar, f"{key}.txt", caption.encode())
                    good.append((key, caption, False))  # read, then counted as unreadable by the pipeline
                elif s == 0 and i == 2:
                    add(tar, f"{key}.jpg", jpeg(n))
                    add(tar, f"{key}.json", json.dumps({**meta, "caption": caption}).encode())
                    good.append((key, caption, True))
                elif s == 0 and i == 3:
                    add(tar, f"{key}.jpg", jpeg(n))  # no caption anywhere
                elif s == 0 and i == 4:
                    add(tar, f"{key}.txt", caption.encode())  # no image
                else:
                    add(tar, f"{key}.jpg", jpeg(n))
                    add(tar, f"{key}.txt", caption.encode())
                    add(tar, f"{key}.json", json.dumps(meta).encode())
                    good.append((key, caption, True))
                n += 1
    last = folder / f"{shards - 1:05d}.tar"
    data = last.read_bytes()
    with tarfile.open(last) as tar:
        members = tar.getmembers()
    assert members[-3].name.endswith(".jpg")
    last.write_bytes(data[: members[-3].offset_data + 10])  # cut inside the last sample's jpg
    cut = members[-3].name.split(".")[0]
    return {"good": [g for g in good if g[0] != cut], "cut_sample": cut}


def assert_exact_neighbours(found_ids, scores, ids, vectors, queries, k: int, atol: float = 1e-5) -> None:
    """`found_ids` / `scores` [Q, k] are an exact top-k over (`ids` [N], `vectors` [N, E]) for `queries` [Q, E]:
    every returned id is one of `ids` (once a row), its returned score is that id's own dot product, and the k
    scores equal the exact k best, so ids differ from numpy's only where scores tie. Checked in float64; `atol`:
    float32 sums of E terms in another order differ by ~E * 2^-24 (1e-5 covers E <= 256 of unit vectors)."""
    found_ids, scores = np.asarray(found_ids), np.asarray(scores, np.float64)
    assert found_ids.shape == scores.shape == (len(queries), k)
    order = np.argsort(ids)
    at = np.searchsorted(ids, found_ids, sorter=order)
    assert (np.asarray(ids)[order][np.minimum(at, len(ids) - 1)] == found_ids).all(), "an id not in the index"
    rows = order[np.minimum(at, len(ids) - 1)]
    assert all(len(set(r)) == k for r in found_ids), "an id returned twice for one query"
    q, v = np.asarray(queries, np.float64), np.asarray(vectors, np.float64)
    own = np.einsum("qe,qke->qk", q, v[rows])
    np.testing.assert_allclose(scores, own, rtol=0, atol=atol)  # each returned id's own score
    best = -np.sort(-(q @ v.T), axis=1)[:, :k]
    np.testing.assert_allclose(scores, best, rtol=0, atol=atol)  # the k best, best first
