"""The trainer application: `python -m train.main --config configs/shapes_tiny.py --workdir runs/x`.

Intentionally short: the same as `jaxmr train` (flags and the call into `jaxmr.training.loop.train` live in
`jaxmr.cli`, so the installed `jaxmr` package needs nothing from this folder).
"""

from __future__ import annotations

import sys

from jaxmr.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["train", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
