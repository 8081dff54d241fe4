"""`jaxmr demo`: the product end to end on the built-in shapes world, with what exists so far.

Today: the data stages (generate the shapes world, preview it, learn the caption tokenizer, run and time the
input pipeline). Training, index building and the search server join here as `jaxmr train`, `jaxmr index`
and `jaxmr serve` land.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from jaxmr.data import PipelineConfig, caption_table, parse_source, train_iterator
from jaxmr.text import Tokenizer, load_tokenizer, train_bpe
from jaxmr.viz import caption_grid

DEMO_SOURCE = "shapes:n=10000,size=64,seed=0"


def demo_tokenizer(workdir: Path, source_spec: str = DEMO_SOURCE) -> Tokenizer:
    """The demo's BPE tokenizer, learned once from the training captions and reused."""
    path = workdir / "tokenizer"
    if (path / "tokenizer.json").exists():
        return load_tokenizer(path)
    texts, _ = caption_table(parse_source(source_spec, "train"))
    tokenizer = train_bpe(texts, vocab_size=1024, max_len=32)
    tokenizer.save(path)
    return tokenizer


def run_demo(workdir: Path, steps: int = 50) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    splits = {split: parse_source(DEMO_SOURCE, split) for split in ("train", "val", "test")}
    print("shapes world: " + ", ".join(f"{s} {len(src)} images" for s, src in splits.items()))
    preview = workdir / "shapes_preview.png"
    caption_grid([splits["train"][i] for i in range(16)], preview)
    print(f"preview of the first 16 training images and captions: {preview}")

    start = time.perf_counter()
    tokenizer = demo_tokenizer(workdir)
    print(
        f"tokenizer: {tokenizer.vocab_size} BPE tokens, max length {tokenizer.max_len} "
        f"({time.perf_counter() - start:.1f} s) -> {workdir / 'tokenizer'}"
    )

    iterator = train_iterator(splits["train"], tokenizer, PipelineConfig(batch_size=256, image_size=64))
    try:
        batch = next(iterator)
        start, images = time.perf_counter(), 0
        for _ in tqdm(range(steps), desc="input pipeline", unit="batch"):
            images += len(next(iterator)["image"])
        rate = images / (time.perf_counter() - start)
    finally:
        iterator.close()
    print(
        f"input pipeline: {rate:.0f} images/s; batch image {batch['image'].shape} {batch['image'].dtype}, "
        f"text {batch['text'].shape} {batch['text'].dtype}"
    )
    print(f"first caption of the first batch: {tokenizer.decode(batch['text'][:1])[0]!r}")
    print("next: `jaxmr train`, `jaxmr index` and `jaxmr serve` extend this demo to a search UI as they land.")
