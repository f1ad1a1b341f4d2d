"""The ``structfx`` command: user errors exit with code 2 and one line, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Structured replacements for PyTorch layers, compiled with TVM.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """structfx: swap dense layers, activations and pools for structured ones; compile; deploy."""


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where the plot goes")] = Path("out"),
    epochs: Annotated[int, typer.Option(min=1, help="training epochs per model")] = 30,
) -> None:
    """Train digits classifiers with dense and structured layers and compare them (built-in data)."""
    from structfx import demo as job

    job.run(out, epochs=epochs)
