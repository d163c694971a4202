"""``dpn tiny``: save a tiny random model of a family with its processor."""

from __future__ import annotations

import argparse

from dpn.lab.tiny_families import FAMILIES as TINY_FAMILIES

NAME = "tiny"


def add_to(commands: argparse._SubParsersAction) -> None:
    tiny = commands.add_parser(NAME, help="save a tiny random model of a family with its processor (to try dpn "
                                          "train / eval offline)")
    tiny.add_argument("--family", choices=("llava", *TINY_FAMILIES), default="llava")
    tiny.add_argument("--output", required=True, help="directory to save it to")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dpn.lab import tiny_families, zoo

    if args.family == "llava":
        model, processor = zoo.build_tiny(seed=args.seed)
    else:
        model, processor = tiny_families.build(args.family, seed=args.seed)
    zoo.save_tiny(model, processor, args.output)
    print(f"a tiny random {type(model).__name__} and its processor in {args.output}")
    return 0
