"""`jaxmr demo`: the whole product in one command, on the built-in shapes world.

    data -> train configs/shapes_tiny.py -> evaluate -> index images and captions -> serve the UI

Every stage reuses what a previous run left in the workdir (a finished training run, an index built by the
same model), so a second `jaxmr demo` goes straight to serving. `--photos DIR` indexes a folder of your own
images instead and serves that: with the LiT photo model of configs/flickr8k_lit.py when it has been trained into
runs/flickr8k_lit (or `--photo-model RUN_OR_EXPORT`), else with the shapes model.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

from jaxmr.config import PACKAGED_CONFIGS, load_config_file
from jaxmr.data import parse_source
from jaxmr.export import read_export_meta
from jaxmr.index.build import BuildOptions, build_index
from jaxmr.index.store import current_version, read_manifest
from jaxmr.serving.app import run as serve_app
from jaxmr.serving.settings import Settings
from jaxmr.training.checkpoints import read_metrics
from jaxmr.training.loop import train
from jaxmr.training.runs import evaluate, model_fingerprint
from jaxmr.viz import caption_grid

CONFIG = PACKAGED_CONFIGS / "shapes_tiny.py"
# The photo model `--photos` uses when it has been trained (configs/flickr8k_lit.py's documented workdir).
PHOTO_RUN = Path("runs/flickr8k_lit")
EXAMPLE_QUERIES = ("a large red circle and a small blue square", "there is a small white diamond",
                   "one small green star and one small green triangle")  # fmt: skip


def print_table(metrics: dict) -> None:
    print(f"{'direction':<14}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'median rank':>14}")
    for name, key in (("text->image", "t2i"), ("image->text", "i2t")):
        row = "".join(f"{metrics[f'{key}_r{k}']:>8.3f}" for k in (1, 5, 10))
        print(f"{name:<14}{row}{metrics[f'{key}_median_rank']:>14.1f}")
    print(f"{metrics['n_images']} images, {metrics['n_captions']} captions")


def ensure_index(run: Path, source_spec: str, split: str, out: Path, progress: bool = True) -> Path:
    """`out` indexed by the run's current model: reused when it is, (re)built otherwise (resumes a partial one)."""
    if current_version(out) is not None:
        if read_manifest(out)["model"]["fingerprint"] == model_fingerprint(run):
            print(f"    reusing the index in {out}")
            return out
        print(f"    {out} was built by another model: rebuilding it")
        shutil.rmtree(out)
    elif (
        (out / ".build").exists()
        and (out / "model").exists()
        and (read_export_meta(out / "model")["fingerprint"] != model_fingerprint(run))
    ):
        shutil.rmtree(out)  # an unfinished build by an older model
    start = time.perf_counter()
    searcher = build_index(run, source_spec, out, split, BuildOptions(), progress=progress)
    m = searcher.manifest
    captions = m["captions"]["count"] if m["captions"] else 0
    print(f"    indexed {m['images']['count']:,} images and {captions:,} captions in "
          f"{time.perf_counter() - start:.0f} s -> {out}")  # fmt: skip
    return out


def run_demo(
    workdir: Path,
    config_spec: str | None = None,
    photos: Path | None = None,
    serve: bool = True,
    host: str = "127.0.0.1",
    port: int = 8000,
    progress: bool = True,
    photo_model: Path | None = None,
) -> Path:
    """Runs the stages and serves until Ctrl-C (or returns the index directory when `serve` is False)."""
    config = load_config_file(config_spec or str(CONFIG))
    workdir.mkdir(parents=True, exist_ok=True)
    train_split = parse_source(config.data.source, "train")
    preview = workdir / "shapes_preview.png"
    caption_grid([train_split[i] for i in range(16)], preview)
    print(f"1/5 data: {train_split.name}, {len(train_split):,} training images; preview: {preview}")

    run = workdir / "shapes_tiny"
    done = [m["step"] for m in read_metrics(run) if "train/loss" in m]
    if done and max(done) >= config.steps:
        print(f"2/5 train: reusing the finished run in {run}")
    else:
        print(f"2/5 train: {config.steps} steps of batch {config.batch_size} -> {run} (resumes if interrupted)")
        start = time.perf_counter()
        train(config, run, progress=progress)
        print(f"    trained in {time.perf_counter() - start:.0f} s")

    print("3/5 evaluate on the test split:")
    print_table(evaluate(run, split="test"))

    if photos is None:
        print("4/5 index every image of the shapes world and its captions:")
        index = ensure_index(run, config.data.source, "all", workdir / "index", progress)
        queries = EXAMPLE_QUERIES
    else:
        photos = Path(photos).resolve()
        model = photo_model or (PHOTO_RUN if (PHOTO_RUN / "checkpoints").is_dir() else None)
        if model is not None:
            print(f"4/5 index your photos in {photos} with the photo model {model}:")
            queries = ("a dog running on the grass", "children playing on a beach", "a man riding a bike")
        else:
            model = run
            print(f"4/5 index your photos in {photos} with the demo model (trained on shapes, not photos; train "
                  f"configs/flickr8k_lit.py into {PHOTO_RUN} for a photo model):")  # fmt: skip
            queries = ("something red", "a circle", "a green object")
        tag = hashlib.sha256(f"{photos}|{Path(model).resolve()}".encode()).hexdigest()[:8]
        index = ensure_index(model, f"images:{photos}", "all", workdir / f"photos-{tag}", progress)
    if not serve:
        return index

    examples = "\n".join(
        f"      curl -s localhost:{port}/api/search -H 'content-type: application/json' -d '{{\"text\": \"{q}\"}}'"
        for q in queries
    )
    print(f"5/5 serve: open http://{host}:{port} and try:\n" + "\n".join(f"      {q}" for q in queries))
    print(f"    or from a shell:\n{examples}")
    serve_app(Settings.from_env(index=str(index), host=host, port=port))
    return index
