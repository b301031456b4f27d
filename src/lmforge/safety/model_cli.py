"""The model-side `lmforge safety` commands: dp-train, interp, unlearn, card."""
from __future__ import annotations

from pathlib import Path

import typer

from lmforge.errors import LmforgeError
from lmforge.model.cli_options import device_option, model_argument, tokenizer_option


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


def interp_command(
    model: str = model_argument(),
    prompt: str = typer.Option("def add(a, b):\n    return a + b\n\nprint(add(", help="the prompt to look inside"),
    corrupt: str = typer.Option(None, help="a corrupted prompt of the same token length: adds activation and "
                                           "attribution patching"),
    out: Path = typer.Option(Path("interp"), "--out", "-o", help="folder for interp.json and the PNG heatmaps"),
    tuned_lens: Path = typer.Option(None, help="UTF-8 text to fit a tuned lens on (affine translator per layer); "
                                               "adds its table next to the logit lens"),
    tuned_lens_steps: int = typer.Option(200, min=1, max=100000),
    tokenizer: str = tokenizer_option(),
    device: str = device_option(),
):
    """Logit lens, attention maps, induction / previous-token head scores, activation and attribution patching."""
    from lmforge.model.pretrained import load_pretrained
    from lmforge.safety.interp_report import interp_report

    if out.exists() and not out.is_dir():
        raise LmforgeError(f"--out {out} is a file, not a folder")
    if tuned_lens is not None and not tuned_lens.is_file():
        raise LmforgeError(f"--tuned-lens {tuned_lens}: no such file")
    pre = load_pretrained(model, tokenizer, dtype="float32", device=device)
    result = interp_report(pre.model, pre.tokenizer, prompt, corrupt, out, tuned_lens_text=(
        tuned_lens.read_text(encoding="utf-8") if tuned_lens is not None else None), tuned_lens_steps=tuned_lens_steps)
    for name in ("logit_lens", "tuned_lens"):
        for row in result.get(name, []):
            typer.echo(f"{name.replace('_', ' ')} layer {row['layer']:>2}: " +
                       ", ".join(f"{t['token']!r} {t['p']:.2f}" for t in row["top"]))
    best = max((s, layer, head) for layer, row in enumerate(result["induction_scores"]) for head, s in enumerate(row))
    typer.echo(f"strongest induction head: layer {best[1]} head {best[2]} (score {best[0]:.2f}); outputs in {out}")


def card_command(
    run_dir: Path = typer.Argument(..., help="a run directory (speedrun run or train.out)"),
    out: Path = typer.Option(None, "--out", "-o", help="folder for model_card.json/.md (default: RUN_DIR)"),
):
    """Model card / governance report (JSON + Markdown) from a run directory."""
    from lmforge.safety.card import write_card

    json_path, md_path = write_card(run_dir, out)
    typer.echo(f"wrote {json_path} and {md_path}")


def unlearn_command(
    args: list[str] = typer.Argument(None, metavar="[MODEL] [SECTION.KEY=VALUE]...",
                                     help="the model (default: the bundled SmolLM2) and overrides, e.g. "
                                          "unlearn.forget=forget.jsonl unlearn.retain=retain.jsonl unlearn.method=npo"),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="YAML recipe"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in train.out"),
):
    """Unlearn (prompt, answer) pairs: gradient ascent, gradient difference or NPO; forget/retain exact match."""
    from lmforge.config import load_recipe
    from lmforge.safety.unlearn_run import UnlearnRecipe, unlearn

    models = [a for a in args or [] if "=" not in a or Path(a).exists()]
    if len(models) > 1:
        raise LmforgeError(f"more than one MODEL given: {', '.join(models)}")
    overrides = [a for a in args or [] if a not in models]
    s = unlearn(load_recipe(UnlearnRecipe, recipe, overrides), models[0] if models else None, resume=resume)
    typer.echo(f"done: forget exact match {s['forget_em_before']:.2f} -> {s['forget_em_after']:.2f}, retain "
               f"{s['retain_em_before']:.2f} -> {s['retain_em_after']:.2f}, forget extraction strength "
               f"{s['forget_es_before']:.2f} -> {s['forget_es_after']:.2f}; model at {s['model_dir']}")


def register(app: typer.Typer) -> None:
    app.command("dp-train")(dp_train_command)
    app.command("interp")(interp_command)
    app.command("card")(card_command)
    app.command("unlearn")(unlearn_command)
