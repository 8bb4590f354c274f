"""Command line: each command parses its options, calls one library function and renders the result."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    help="Per-frame facial-affect features (valence/arousal, 7 expressions, 17 AUs) from video.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)


if __name__ == "__main__":
    app()
