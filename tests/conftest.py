"""Shared fixtures. Sharded paths run on 8 fake CPU devices, set before jax is first imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One full-suite run hung inside tokenizers' BPE training (its rayon pool) after earlier tests had forked grain
# workers and run threaded encoders in this process; the tests' tokenizers are tiny, so run them sequentially.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Generated data (the shapes cache) goes to a fresh folder per test session, not the user's ~/.cache.
os.environ.setdefault("JAXMR_CACHE", __import__("tempfile").mkdtemp(prefix="jaxmr-test-cache-"))

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


def wait_ready(get, timeout: float = 120) -> None:
    """Polls a server's /readyz (through `get`, a test client's or a requests-like function) until it is 200."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if get("/readyz").status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError("the server did not become ready")
