"""The LiT recipe's tower ablation on Flickr8k dev: each tower swap alone and together, at equal steps.

    python -m bench.lit_ablation [--variants lite0,views1,mpnet,...] [--steps 2400] [--workdir runs/lit_ablation]
    python -m bench.lit_ablation --quick --set data.source=captions:DIR   # one 4-step run (CI smoke)
    python -m bench.lit_ablation --variants base --name lit_default --workdir /tmp/lit_default   # from scratch

Each variant is `configs/flickr8k_lit.py:VARIANT` ("base" = the config as it is) trained by `jaxmr train` in its
own process, all over one shared features folder: the cache is one file per tower and split, so a tower's
features are computed by the first run that uses it and reused by the others (`new_features` says which run paid
for which). The recall is the run's last evaluation on the cached dev features, which equals `jaxmr eval`
end to end (tests/models/test_pretrained.py). Results are written after every run:
bench/results/lit_ablation-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import write_results

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "flickr8k_lit.py"
DEFAULT = "lite0,views1,mpnet,lite2+views1,lite2+mpnet+views1"
COLUMNS = ["variant", "image", "text", "views", "steps", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "wall_s",
           "new_features"]  # fmt: skip


def run_variant(variant: str, workdir: Path, features: Path, overrides: str) -> dict:
    """Trains one variant in its own process over the shared `features` folder; its record."""
    from jaxmr.config import load_config_file
    from jaxmr.training.checkpoints import read_metrics

    spec = f"{CONFIG}{'' if variant == 'base' else ':' + variant}{overrides}"
    config = load_config_file(spec)
    run = workdir / variant.replace("+", "_")
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "features").exists():
        (run / "features").symlink_to(features.resolve(), target_is_directory=True)
    before = {p.name for p in features.glob("*.npz")}
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "jaxmr.cli", "train", "--config", spec, "--workdir", str(run), "--no-progress"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    new = sorted({"-".join(p.split("-")[:2]) for p in {p.name for p in features.glob("*.npz")} - before})
    last = [m for m in read_metrics(run) if "eval/t2i_r1" in m][-1]
    image, text = config.model.image, config.model.text
    return {
        "variant": variant, "image": f"{image.variant} {config.data.image_size}px", "text": type(text).__name__,
        "views": config.feature_views, "steps": int(last["step"]),
        **{k: round(float(last[f"eval/{k}"]), 4) for k in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1")},
        "wall_s": round(wall, 1), "new_features": " ".join(new) or "-",
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=DEFAULT, help=f"comma-separated (default {DEFAULT})")
    parser.add_argument("--steps", type=int, default=None, help="override the config's steps (equal for all)")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "lit_ablation"))
    parser.add_argument("--set", default="", help="more config overrides for every variant (key=value,...)")
    parser.add_argument(
        "--quick", action="store_true", help="views1 for 4 steps at 64 px (give a small --set data.source=...)"
    )
    parser.add_argument(
        "--name",
        default="lit_ablation",
        help="results name: bench/results/NAME-<machine> (lit_default: the default from scratch)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    overrides = f",steps={args.steps}" if args.steps else ""
    overrides += f",{args.set}" if args.set else ""
    variants = args.variants.split(",")
    if args.quick:
        variants = ["views1"]
        overrides += (",steps=4,eval_every=4,checkpoint_every=4,batch_size=10,eval_batch_size=8,data.image_size=64,"
                      "model.image.image_size=64,data.read_threads=0")  # fmt: skip
    workdir = Path(args.workdir)
    features = workdir / "features"
    cached = features.is_dir() and any(features.glob("*.npz"))
    features.mkdir(parents=True, exist_ok=True)
    fresh = f" A fresh features folder ({features}): every tower's features computed by this run." if not cached else ""
    title = "LiT tower ablation on Flickr8k dev" if args.name == "lit_ablation" else f"LiT on Flickr8k dev: {args.name}"
    records = []
    for variant in variants:
        records.append(run_variant(variant, workdir, features, overrides))
        print(json.dumps(records[-1]), flush=True)
        command = f"python -m bench.lit_ablation --variants {','.join(variants)}"
        command += (f" --set {args.set}" if args.set else "") + (f" --steps {args.steps}" if args.steps else "")
        command += f" --name {args.name}" if args.name != "lit_ablation" else ""
        notes = (f"`{command}`: configs/flickr8k_lit.py and its tower swaps, "
                 "Flickr8k train -> dev (984 images, 4,920 captions), recall of each run's last evaluation. wall_s is "
                 "the whole `jaxmr train` of that run, including the features it was the first to need (new_features)"
                 "; the others were reused from earlier rows.")  # fmt: skip
        path = write_results(
            args.name, records, COLUMNS, title, notes + fresh, args.out, extra={"fresh_features": not cached}
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
