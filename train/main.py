"""The trainer application: `python -m train.main --config configs/shapes_tiny.py --workdir runs/x`.

Intentionally short: it parses flags and calls `jaxmr.trainer.train` (the same as `jaxmr train`).
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxmr import distributed
from jaxmr.config import ComposedConfig, apply_overrides, load_config_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="configs/NAME.py[:variant][,key=value,...]")
    parser.add_argument("--workdir", required=True, help="run directory (resumed when it holds a run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--stop-at-step", type=int, default=None, help="save and stop at this step (resumable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(parser)


def run(args: argparse.Namespace) -> None:
    config = apply_overrides(load_config_file(args.config), args.set)
    multi = distributed.initialize(args)  # before anything asks JAX for devices
    if isinstance(config, ComposedConfig):  # composed queries on top of a trained dual encoder
        from jaxmr.composed import train as train_composed

        if multi:
            raise ValueError("the composed-query trainer runs in one process (it trains in minutes on one device)")
        metrics = train_composed(config, args.workdir, progress=not args.no_progress)
    else:
        from jaxmr.trainer import train

        metrics = train(config, args.workdir, stop_at_step=args.stop_at_step, progress=not args.no_progress)
    if metrics and distributed.is_primary():
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))


def main(argv: list[str] | None = None) -> int:
    from jaxmr.cli import main as cli_main

    return cli_main(["train", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
