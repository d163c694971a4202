"""``dpn tiny``: save a tiny random model of a family with its processor."""

from __future__ import annotations

import argparse

from dpn.lab.families import tiny_builders

NAME = "tiny"


def add_to(commands: argparse._SubParsersAction) -> None:
    tiny = commands.add_parser(NAME, help="save a tiny random model of a family with its processor (to try dpn "
                                          "train / eval offline)")
    tiny.add_argument("--family", choices=tuple(tiny_builders()), default="llava")
    tiny.add_argument("--output", required=True, help="directory to save it to")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dpn.lab.families import zoo
    from dpn.lab.families import build_tiny

    model, processor = build_tiny(args.family, seed=args.seed)
    zoo.save_tiny(model, processor, args.output)
    print(f"a tiny random {type(model).__name__} and its processor in {args.output}")
    return 0
