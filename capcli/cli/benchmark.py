"""`capcli benchmark ...`: speed, size and quality side by side."""

from __future__ import annotations

import typer

app = typer.Typer(help="Benchmarks: encoders, decoding, training steps, preparing, the paper's study grid.",
                  no_args_is_help=True)
