"""`lmforge train`: pretraining from a YAML recipe plus key=value overrides."""
from __future__ import annotations

import os
from pathlib import Path

import typer

from lmforge.config import load_recipe
from lmforge.train.config import TrainRecipe


def train_command(
    overrides: list[str] = typer.Argument(None, help="section.key=value, e.g. train.lr=1e-3 model.preset=tiny"),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="YAML recipe (see recipes/)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in train.out"),
):
    """Pretrain a model on token shards."""
    from lmforge.train.trainer import train

    summary = train(load_recipe(TrainRecipe, recipe, overrides), resume=resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line, not one per process
        typer.echo(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, model at {summary['model_dir']}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
