"""`lmforge safety ...` (minimal: the model-side commands; the guard and red-team commands join it)."""
from __future__ import annotations

import importlib

import typer

safety_app = typer.Typer(help="Guard, red-team and other safety tools.", no_args_is_help=True)

# other safety modules add their commands with `register(safety_app)`, one line each here
EXTRA_COMMANDS: tuple[str, ...] = ("lmforge.safety.model_cli",)


def register(app: typer.Typer) -> None:
    for module in EXTRA_COMMANDS:
        importlib.import_module(module).register(safety_app)
    app.add_typer(safety_app, name="safety")
