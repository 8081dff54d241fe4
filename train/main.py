"""The trainer application: `python -m train.main --config configs/shapes_tiny.py --workdir runs/x`.

Intentionally short: it parses flags and calls `jaxmr.trainer.train` (the same as `jaxmr train`).
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxmr.config import ComposedConfig, apply_overrides, load_config_file
from jaxmr.trainer import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="configs/NAME.py[:variant][,key=value,...]")
    parser.add_argument("--workdir", required=True, help="run directory (resumed when it holds a run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--stop-at-step", type=int, default=None, help="save and stop at this step (resumable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> None:
    config = apply_overrides(load_config_file(args.config), args.set)
    if isinstance(config, ComposedConfig):  # composed queries on top of a trained dual encoder
        from jaxmr.composed import train as train_composed

        metrics = train_composed(config, args.workdir, progress=not args.no_progress)
    else:
        metrics = train(config, args.workdir, stop_at_step=args.stop_at_step, progress=not args.no_progress)
    if metrics:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))


def main(argv: list[str] | None = None) -> int:
    from jaxmr.cli import main as cli_main

    return cli_main(["train", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
