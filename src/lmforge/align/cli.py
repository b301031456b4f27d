"""`lmforge finetune`: post-training commands (`sft`), each a recipe plus key=value overrides."""
from __future__ import annotations

from pathlib import Path

import typer

from lmforge.errors import LmforgeError
from lmforge.model.cli_options import model_alias, pick_model, tokenizer_option

RECIPES = Path(__file__).parents[1] / "recipes"
finetune = typer.Typer(help="Post-train a model: supervised finetuning on chats.", no_args_is_help=True)


@finetune.command("sft")
def sft_command(
    args: list[str] = typer.Argument(None, metavar="[MODEL] [SECTION.KEY=VALUE]...",
                                     help="the model to start from (lmforge checkpoint dir, HF dir or .gguf; default: "
                                          "the bundled SmolLM2-135M-Instruct GGUF) and overrides, e.g. train.lr=1e-4 "
                                          "sft.data=chats.jsonl"),
    recipe: Path = typer.Option(RECIPES / "sft-tiny.yaml", "--recipe", "-r", help="YAML recipe"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in train.out"),
    tokenizer: str = tokenizer_option(),
    model_opt: str = model_alias(),
):
    """Supervised finetuning: loss on assistant tokens only; writes train.out/model (weights + tokenizer)."""
    from lmforge.align.sft import SFTRecipe, finetune_sft
    from lmforge.config import load_recipe

    models = [a for a in args or [] if "=" not in a or Path(a).exists()]
    if len(models) > 1:
        raise LmforgeError(f"more than one MODEL given: {', '.join(models)}")
    model = pick_model(models[0] if models else None, model_opt)
    overrides = [a for a in args or [] if a not in models]
    if tokenizer:
        overrides.append(f"sft.tokenizer={tokenizer}")
    summary = finetune_sft(load_recipe(SFTRecipe, recipe, overrides), model, resume=resume)
    val = f", held-out loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""
    typer.echo(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}{val}, "
               f"model at {summary['model_dir']}")


def register(app: typer.Typer) -> None:
    app.add_typer(finetune, name="finetune")
