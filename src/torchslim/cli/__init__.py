"""Command line: ``torchslim demo | compress | sensitivity | search``."""

from __future__ import annotations

import argparse
import sys

from ..core.errors import TorchslimError
from ..core.threads import threads_override
from .commands import add_commands, add_threads_option, command_parser, finish
from .demo import run_demo


def _demo(args: argparse.Namespace) -> int:
    return finish(run_demo(args.out, seed=args.seed, overwrite=args.overwrite, quick=args.quick), args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchslim", description="Make trained PyTorch models smaller and faster.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = command_parser(sub, "demo", "train LeNet-5 on the bundled digits data, search the smallest model within "
                          "one accuracy point, write the report", "torchslim demo",
                          "torchslim demo --out out/demo-seed1 --seed 1 --overwrite")
    demo.add_argument("--out", default="out/demo", help="output folder (report.json, report.md, plots, model.slim)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data split, training and search")
    demo.add_argument("--quick", action="store_true", help="fewer epochs (for tests)")
    demo.add_argument("--overwrite", action="store_true", help="replace outputs already in --out")
    add_threads_option(demo)
    demo.set_defaults(func=_demo)
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with threads_override(args.threads):
            return args.func(args)
    except TorchslimError as exc:
        print(f"torchslim: error: {exc}", file=sys.stderr)
        return 2


