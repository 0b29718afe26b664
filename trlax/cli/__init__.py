"""The `trlax` command line: one small function per subcommand registers its subparser.

    trlax convert SRC DST [--to orbax|hf] [--value-head auto|yes|no] [--dtype ...]
    trlax demo [--model PATH_OR_HUB_ID] [--steps N] [--batch-size B] [--seed S] [--output-dir DIR]
    trlax info PATH_OR_HUB_ID [--num-shared-layers N] [--json]
    trlax ppo [--model PATH_OR_HUB_ID] [--reward-model PATH | --reward-adapter PATH | --reward-fn MOD:FN] [...]
"""

from __future__ import annotations

import argparse
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `trlax` console script and `python -m trlax`."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except TrlaxError as e:
        message = " ".join(str(e).split())  # one line, whatever the message (transformers' span several)
        print(f"trlax {args.command}: error: {message}", file=sys.stderr)
        return 1
