"""`lmforge safety dp-train`: the model-side safety commands (DP-SGD; more join here)."""
from __future__ import annotations

from pathlib import Path

import typer


def dp_train_command(
    overrides: list[str] = typer.Argument(None, help="section.key=value, e.g. train.dp.target_epsilon=1 "
                                                     "train.dp.max_grad_norm=1"),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="YAML recipe (see recipes/)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in train.out"),
):
    """Pretrain with DP-SGD (train.dp.*): per-example clipping, Gaussian noise, Poisson sampling; logs ε."""
    from lmforge.config import load_recipe
    from lmforge.safety.dp_sgd import dp_train
    from lmforge.train.config import TrainRecipe

    summary = dp_train(load_recipe(TrainRecipe, recipe, ["train.dp.enabled=true", *(overrides or [])]), resume=resume)
    typer.echo(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
               f"epsilon {summary['dp_epsilon']:.3f} at delta {summary['dp_delta']:g} "
               f"(sigma {summary['dp_noise_multiplier']:.3f}, q {summary['dp_sample_rate']:.4g}), "
               f"model at {summary['model_dir']}")


def register(app: typer.Typer) -> None:
    app.command("dp-train")(dp_train_command)
