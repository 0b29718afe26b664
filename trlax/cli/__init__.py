"""The `trlax` command line: one small function per subcommand registers its subparser.

    trlax convert SRC DST [--to orbax|hf] [--value-head auto|yes|no] [--dtype ...]
    trlax demo [--model PATH_OR_HUB_ID] [--steps N] [--batch-size B] [--seed S] [--output-dir DIR]
    trlax info PATH_OR_HUB_ID [--num-shared-layers N] [--json]
    trlax ppo [--model PATH_OR_HUB_ID] [--reward-model PATH | --reward-adapter PATH | --reward-fn MOD:FN] [...]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from trlax.cli.convert import add_convert
from trlax.cli.demo import add_demo
from trlax.cli.info import add_info
from trlax.cli.ppo import add_ppo
from trlax.errors import TrlaxError


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2), not the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="trlax", description="trlax command line tools")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_convert, add_demo, add_info, add_ppo):
        add(subparsers)
    for subparser in subparsers.choices.values():  # so main() reports stray arguments under the subcommand
        subparser.set_defaults(subparser=subparser)
    return parser


def fail(command: str, message: str) -> int:
    """Print one error line for `command` on stderr; the exit status 1."""
    message = " ".join(message.split())  # one line, whatever the message (transformers' span several)
    print(f"trlax {command}: error: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `trlax` console script and `python -m trlax`.

    Every failure is one line on stderr and a non-zero exit status: 2 for a usage error,
    130 for Ctrl-C, 1 otherwise. `TRLAX_DEBUG=1` shows the traceback instead.
    """
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except Exception as e:
        if os.environ.get("TRLAX_DEBUG", "") not in ("", "0"):
            raise
        if isinstance(e, TrlaxError):
            return fail(args.command, str(e))
        if isinstance(e, OSError):  # a file or folder it cannot read or write
            where = f": {e.filename}" if e.filename else ""
            return fail(args.command, f"{e.strerror or e}{where}")
        if isinstance(e, MemoryError):
            return fail(args.command, "out of memory; try a smaller --batch-size or model")
        return fail(args.command, f"unexpected {type(e).__name__}: {e} (TRLAX_DEBUG=1 shows the traceback; "
                                  "please report it)")
    except KeyboardInterrupt:
        print(f"trlax {args.command}: interrupted", file=sys.stderr)
        return 130
