"""The `lmforge` command: one Typer app; each stage registers its own sub-commands."""
from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from lmforge.errors import LmforgeError

app = typer.Typer(help="lmforge: the whole life of a language model.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)

# Each module exposes `register(app)`; the order is the order of a model's life.
STAGES = (
    "lmforge.data.cli",
    "lmforge.tokenizer.cli",
    "lmforge.train.cli",
    "lmforge.model.cli",
    "lmforge.serve.cli",
    "lmforge.eval.cli",
    "lmforge.plan.cli",
    "lmforge.speedrun",
)
for _module in STAGES:
    importlib.import_module(_module).register(app)


def main() -> None:
    """Entry point: user errors become one red line and exit code 2, never a traceback."""
    try:
        typer.main.get_command(app).main(prog_name="lmforge", standalone_mode=True)
    except LmforgeError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/]")
        sys.exit(130)
