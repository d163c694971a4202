"""The ``dpn`` command line: one subcommand per module of ``dpn.lab.commands``.

Every command owns its arguments (``add_to``) and its handler; this module only assembles them,
prints ``--version`` and turns a ``ValueError`` or ``FileNotFoundError`` into exit status 2 with
the message (what to fix) on stderr.
"""

from __future__ import annotations

import argparse
import sys

import torch

from dpn.lab.commands import COMMANDS


def _version_line() -> str:
    """dpn's version and the versions it runs on (what a bug report needs)."""
    import transformers

    import dpn

    return f"dpn {dpn.__version__} (torch {torch.__version__}, transformers {transformers.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpn", description="Dynamic Pyramid Networks for multimodal LLMs")
    parser.add_argument("--version", action="version", version=_version_line())
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_to(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "text_tokens", 1) < 1:
        print("dpn: --text-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"dpn: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
