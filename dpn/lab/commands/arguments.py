"""What several commands take alike: a saved model directory and a pyramid spec."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpn import presets

MODEL_HELP = "model directory (its saved pyramid is used, if any)"


def add_model(parser: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    parser.add_argument("--model", required=True, help=help)


def add_pyramid(parser: argparse.ArgumentParser, saved: str = "saved (the one beside the model)",
                default: str | None = "saved") -> None:
    parser.add_argument("--pyramid", default=default, help=f"{saved} | {presets.spec_help()}")


def require_model(path: str) -> None:
    """Refuse a ``--model`` that is not a saved model directory before anything loads."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (a directory with config.json)")


def command_line(name: str) -> str:
    """The command as the user typed it (for the results page to say how to regenerate it), or
    ``dpn NAME`` when it was called from Python."""
    return f"dpn {name} " + " ".join(sys.argv[2:]) if sys.argv[1:2] == [name] else f"dpn {name}"
