"""Training from converted shards against training from the source itself: same config, same steps, same seed.

    python -m bench.shard_training [--steps 300] [--config configs/shapes_tiny.py] [--quick]

The source (default: the config's, the shapes world) is converted with `jaxmr data convert` to ArrayRecord, then
the config trains twice, once on the source and once on `arrayrecord:DIR` (its splits kept), and both runs are
evaluated on the source's test split by `jaxmr.training.runs.evaluate`. Results:
bench/results/shard_training-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from bench.common import write_results

ROOT = Path(__file__).resolve().parents[1]


def run(config_spec: str, steps: int) -> list[dict]:
    from jaxmr.config import load_config_file
    from jaxmr.data.convert import convert_to_arrayrecord
    from jaxmr.training.loop import train
    from jaxmr.training.runs import evaluate

    config = load_config_file(config_spec)
    config = dataclasses.replace(config, steps=steps, eval_every=steps, checkpoint_every=steps)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = convert_to_arrayrecord(config.data.source, Path(tmp) / "ar", progress=False)
        convert_s = time.perf_counter() - start
        for name, source in (("source", config.data.source), ("arrayrecord", f"arrayrecord:{Path(tmp) / 'ar'}")):
            run_config = dataclasses.replace(config, data=dataclasses.replace(config.data, source=source))
            start = time.perf_counter()
            train(run_config, Path(tmp) / name, progress=False)
            seconds = time.perf_counter() - start
            test = evaluate(Path(tmp) / name, config.data.source, "test")
            records.append({"data": name if name == "source" else f"arrayrecord ({manifest['read']} converted in "
                            f"{convert_s:.0f} s)", "steps": steps, "train_s": round(seconds, 1),
                            "test_t2i_r1": test["t2i_r1"], "test_i2t_r1": test["i2t_r1"],
                            "test_t2i_r5": test["t2i_r5"]})  # fmt: skip
            print(records[-1])
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes_tiny.py"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="the smoke config, 4 steps (CI smoke)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    spec, steps = (f"{ROOT / 'configs' / 'shapes_tiny.py'}:smoke", 4) if args.quick else (args.config, args.steps)
    records = run(spec, steps)
    a, b = records
    notes = (f"{spec}, {steps} steps, seed as configured; both evaluated on the source's test split. t2i R@1 "
             f"{a['test_t2i_r1']:.4f} from the source, {b['test_t2i_r1']:.4f} from the converted shards (difference "
             f"{b['test_t2i_r1'] - a['test_t2i_r1']:+.4f}).")  # fmt: skip
    path = write_results("shard_training", records, ["data", "steps", "train_s", "test_t2i_r1", "test_i2t_r1",
                         "test_t2i_r5"], "Training from converted shards vs from the source", notes,
                         args.out)  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
