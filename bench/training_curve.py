"""A training run's curve: eval recall and loss against step and wall time, as JSON, a table and a PNG plot.

    python -m bench.training_curve --workdir runs/shapes_tiny --name shapes_default [--test]

With --test the run's last checkpoint is also evaluated on the test split (the figure `jaxmr eval` prints).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import write_results
from jaxmr.training.checkpoints import read_metrics
from jaxmr.training.runs import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--test", action="store_true", help="also evaluate the last checkpoint on the test split")
    args = parser.parse_args()
    metrics = read_metrics(args.workdir)
    if not metrics:
        raise SystemExit(f"no metrics in {args.workdir}")
    train = [m for m in metrics if "train/loss" in m]
    evals = [m for m in metrics if "eval/t2i_r1" in m]
    # wall time: sum over logged intervals of (examples in the interval / examples per second)
    config = json.loads((Path(args.workdir) / "config.json").read_text())
    batch, seconds, clock, previous = config["batch_size"], {}, 0.0, 0
    for m in train:
        clock += (m["step"] - previous) * batch / m["train/examples_per_s"]
        seconds[m["step"]], previous = clock, m["step"]
    keys = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")
    records = [
        {"step": m["step"], "train_minutes": seconds.get(m["step"], 0) / 60, **{k: m[f"eval/{k}"] for k in keys}}
        for m in evals
    ]
    notes = f"Run: `{args.workdir}`, config saved in its config.json; eval on the run's eval split."
    if args.test:
        test = evaluate(args.workdir, split="test")
        last = {"step": f"{evals[-1]['step']} (test split)", "train_minutes": records[-1]["train_minutes"]}
        records.append({**last, **{k: test[k] for k in keys}})
    columns = ["step", "train_minutes", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"]
    path = write_results(args.name, records, columns, f"Training curve: {args.name}", notes)
    plot(train, evals, seconds, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def plot(train: list[dict], evals: list[dict], seconds: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([m["step"] for m in train], [m["train/loss"] for m in train], lw=1)
    left.set(xlabel="step", ylabel="train loss", title="loss")
    for key, style in (("eval/t2i_r1", "o-"), ("eval/t2i_r5", "s--"), ("eval/i2t_r1", "^-")):
        right.plot([seconds[m["step"]] / 60 for m in evals], [m[key] for m in evals], style, label=key[5:])
    right.set(xlabel="training minutes", ylabel="recall", ylim=(0, 1), title="eval recall")
    right.grid(alpha=0.3)
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main()
