"""The ``dpn`` commands: one module per command, each owning its arguments.

A command module has ``NAME`` and ``add_to(subparsers)``, which adds its parser (arguments and
help) and sets ``handler`` to the function that runs it. ``dpn.lab.cli`` builds the parser from
``COMMANDS`` in this order (the order of ``dpn --help``).
"""

from __future__ import annotations

from dpn.lab.commands import (
    bench, chat, compare, data, demo, evaluate, flops, paths, serve, serve_bench, tiny, train,
)

COMMANDS = (data, tiny, train, evaluate, chat, serve, serve_bench, demo, paths, compare, bench, flops)

__all__ = ["COMMANDS"]
