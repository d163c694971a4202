"""The console the lab prints its tables on.

Printed to a file or a pipe (CI logs, ``| tee``), rich assumes 80 columns and wraps wide tables
into unreadable cells; there it gets ``PIPED_WIDTH`` columns instead. A terminal keeps its width.
"""

from __future__ import annotations

from rich.console import Console

PIPED_WIDTH = 200


def console() -> Console:
    terminal = Console()
    return terminal if terminal.is_terminal else Console(width=PIPED_WIDTH)
