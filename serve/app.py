"""The server application: `python -m serve.app` serves the index that JAXMR_INDEX names (the same as `jaxmr serve`).

A thin script over `jaxmr.serving`, where the Litestar app, the engine and the web UI live (so that an installed
`jaxmr` serves without this folder). Settings come from the environment (`jaxmr.serving.settings.Settings`).
"""

from __future__ import annotations

import sys

from jaxmr.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["serve", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
