"""The ``tvlens`` command line (also ``python -m tvlens``).

Each command group lives in its own module under ``tvlens/cli/`` exposing
``register(subparsers)``; it adds its subcommands, each with ``set_defaults(func=...)``
taking the parsed ``args`` and returning an exit code. Errors are one line on stderr and
exit code 2 — never a traceback (set ``TVLENS_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from tvlens.errors import TvlensError

# Command groups, in the order `tvlens --help` lists them. Missing modules are skipped.
COMMAND_MODULES = (
    "tvlens.cli.core",       # demo, models, tasks, evaluate
    "tvlens.cli.extract",    # extract, sweep
    "tvlens.cli.learn",      # learn
    "tvlens.cli.attribute",  # attribute, ablate-heads
    "tvlens.cli.adaptive",   # adaptive train|evaluate
    "tvlens.cli.tvp",        # tvp train|compare
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvlens", description="Mechanistic interpretability of task vectors."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(sub)
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
