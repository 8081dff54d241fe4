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
    path = write_curve(args.workdir, args.name, args.test)
    print(f"wrote {path} and {path.with_suffix('.png')}")


COLUMNS = ["step", "split", "train_minutes", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"]
KEYS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")


def curve(workdir: str | Path, test: bool) -> tuple[list[dict], list[dict], list[dict], dict]:
    """A run's eval records (a last one on the test split with `test`), its train and eval metrics, and the
    training seconds at each logged step (the sum over logged windows of examples / examples per second)."""
    metrics = read_metrics(workdir)
    if not metrics:
        raise SystemExit(f"no metrics in {workdir}")
    train = [m for m in metrics if "train/loss" in m]
    evals = [m for m in metrics if "eval/t2i_r1" in m]
    config = json.loads((Path(workdir) / "config.json").read_text())
    batch, seconds, clock, previous = config["batch_size"], {}, 0.0, 0
    for m in train:
        clock += (m["step"] - previous) * batch / m["train/examples_per_s"]
        seconds[m["step"]], previous = clock, m["step"]
    records = [
        {"step": m["step"], "split": "eval", "train_minutes": seconds.get(m["step"], 0) / 60,
         **{k: m[f"eval/{k}"] for k in KEYS}}
        for m in evals
    ]  # fmt: skip
    if test:
        result = evaluate(workdir, split="test")
        records.append({**records[-1], "split": "test", **{k: result[k] for k in KEYS}})
    return records, train, evals, seconds


def write_curve(workdir: str | Path, name: str, test: bool, notes: str = "", extra: dict | None = None,
                out: str | None = None) -> Path:  # fmt: skip
    """`curve` written as bench/results/NAME-<machine>.{json,md} (or `out`) with its plot beside them."""
    records, train, evals, seconds = curve(workdir, test)
    notes = notes or f"Run: `{workdir}`, config saved in its config.json; eval on the run's eval split."
    path = write_results(name, records, COLUMNS, f"Training curve: {name}", notes, out, extra=extra)
    plot(train, evals, seconds, path.with_suffix(".png"))
    return path


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
