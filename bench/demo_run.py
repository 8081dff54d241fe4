"""`jaxmr demo` from nothing, timed: the README's shapes default figure (test recall, minutes, examples/s).

    git clone REPO /tmp/fresh && cd /tmp/fresh && make install && .venv/bin/python -m bench.demo_run

Runs `jaxmr demo --no-serve` into an empty workdir (nothing to reuse: the whole of what `make demo` does after
the install), then writes the run's training curve with the test split's recall and the demo's own timings
to bench/results/shapes_default-<machine>.{json,md,png}. `--workdir` must not hold a run already.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.training_curve import write_curve

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="an empty folder for the demo (default: a temporary one)")
    parser.add_argument("--name", default="shapes_default")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="jaxmr-demo-"))
    if workdir.exists() and any(workdir.iterdir()):
        raise SystemExit(f"error: {workdir} is not empty: the demo would reuse what is there")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    cmd = [sys.executable, "-m", "jaxmr.cli", "demo", "--no-serve", "--no-progress", "--workdir", str(workdir)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"error: jaxmr demo failed with status {done.returncode}")
    trained = re.search(r"trained in (\d+) s", done.stdout)
    run = workdir / "shapes_tiny"
    from jaxmr.training.checkpoints import read_metrics

    train = [m for m in read_metrics(run) if "train/loss" in m]
    demo = {
        "wall_s": round(wall, 1),
        "train_s": float(trained.group(1)) if trained else None,
        "steps": train[-1]["step"],
        "examples_per_s": statistics.median(m["train/examples_per_s"] for m in train),
        "data_wait_share": statistics.mean(m.get("train/data_wait_share", 0.0) for m in train),
        "commit": commit.stdout.strip(),
        "fresh_workdir": True,
    }
    notes = (
        f"`python -m bench.demo_run` at commit {demo['commit']}: `jaxmr demo --no-serve` into an empty workdir "
        f"({demo['wall_s'] / 60:.1f} min in all: data, training {demo['train_s']:.0f} s, test evaluation, both "
        f"indexes), median logged {demo['examples_per_s']:.0f} examples/s, {100 * demo['data_wait_share']:.1f} % "
        "of training waiting for data. train_minutes: the logged windows' examples over examples/s; the last row "
        "is the last checkpoint on the test split (what the demo prints)."
    )
    path = write_curve(run, args.name, test=True, notes=notes, extra={"demo": demo}, out=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
