"""The ``tvlens`` command line (also ``python -m tvlens``).

Each command group lives in its own module under ``tvlens/cli/`` exposing
``register(subparsers)``; it adds its subcommands, each with ``set_defaults(func=...)``
taking the parsed ``args`` and returning an exit code. Errors are one line on stderr and
exit code 2 — never a traceback (set ``TVLENS_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import os
import sys

from tvlens.cli import adaptive, attribute, core, extract, learn, reproduce, tvp
from tvlens.errors import TvlensError

# Command groups, in the order `tvlens --help` lists them.
COMMAND_MODULES = (
    core,       # demo, models, tasks, prompt, evaluate
    extract,    # extract, sweep
    learn,      # learn
    attribute,  # attribute, ablate-heads
    adaptive,   # adaptive train|evaluate
    tvp,        # tvp train|compare
    reproduce,  # reproduce (every finding, one report), pages (results pages from reports)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvlens", description="Mechanistic interpretability of task vectors."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except TvlensError as err:
        print(f"tvlens: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tvlens: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI promises no tracebacks
        if os.environ.get("TVLENS_DEBUG"):
            raise
        print(f"tvlens: error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
              "(set TVLENS_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
