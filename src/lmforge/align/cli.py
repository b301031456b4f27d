"""`lmforge finetune`: post-training commands (`sft`, `dpo`, `rm`, `grpo`), each a recipe plus key=value overrides."""
from __future__ import annotations

from pathlib import Path

import typer

from lmforge.errors import LmforgeError
from lmforge.model.cli_options import model_alias, pick_model, tokenizer_option

RECIPES = Path(__file__).parents[1] / "recipes"
finetune = typer.Typer(help="Post-train a model: supervised finetuning, DPO, reward models, GRPO.", no_args_is_help=True)


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


def model_and_overrides(args: list[str] | None, model_opt: str | None) -> tuple[str | None, list[str]]:
    """[MODEL] [SECTION.KEY=VALUE]... -> (MODEL or None, overrides): an argument with '=' is an
    override unless it names an existing path."""
    models = [a for a in args or [] if "=" not in a or Path(a).exists()]
    if len(models) > 1:
        raise LmforgeError(f"more than one MODEL given: {', '.join(models)}")
    return pick_model(models[0] if models else None, model_opt), [a for a in args or [] if a not in models]


@finetune.command("dpo")
def dpo_command(
    args: list[str] = typer.Argument(None, metavar="[MODEL] [SECTION.KEY=VALUE]...",
                                     help="the model to start from (lmforge checkpoint dir, HF dir or .gguf; default: "
                                          "the bundled SmolLM2-135M-Instruct GGUF) and overrides, e.g. dpo.beta=0.1 "
                                          "dpo.loss_type=ipo dpo.data=pairs.jsonl"),
    recipe: Path = typer.Option(RECIPES / "dpo-tiny.yaml", "--recipe", "-r", help="YAML recipe"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in train.out"),
    tokenizer: str = tokenizer_option(),
    model_opt: str = model_alias(),
):
    """Direct Preference Optimisation on prompt/chosen/rejected pairs; reference log-probs computed once
    from the starting weights and cached in train.out; writes train.out/model."""
    from lmforge.align.dpo import DPORecipe, finetune_dpo
    from lmforge.config import load_recipe

    model, overrides = model_and_overrides(args, model_opt)
    if tokenizer:
        overrides.append(f"dpo.tokenizer={tokenizer}")
    summary = finetune_dpo(load_recipe(DPORecipe, recipe, overrides), model, resume=resume)
    typer.echo(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, model at {summary['model_dir']}")


@finetune.command("rm")
def rm_command(
    args: list[str] = typer.Argument(None, metavar="[MODEL] [SECTION.KEY=VALUE]...",
                                     help="the model to start from (lmforge checkpoint dir, HF dir or .gguf; default: "
                                          "the bundled SmolLM2-135M-Instruct GGUF) and overrides, e.g. rm.margin=0.5 "
                                          "rm.data=pairs.jsonl"),
    recipe: Path = typer.Option(RECIPES / "rm-tiny.yaml", "--recipe", "-r", help="YAML recipe"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in train.out"),
    tokenizer: str = tokenizer_option(),
    model_opt: str = model_alias(),
):
    """Bradley-Terry reward model on prompt/chosen/rejected pairs (a scalar head on the last token's
    hidden state); writes train.out/model with reward_head.safetensors."""
    from lmforge.align.reward_model import RMRecipe, finetune_rm
    from lmforge.config import load_recipe

    model, overrides = model_and_overrides(args, model_opt)
    if tokenizer:
        overrides.append(f"rm.tokenizer={tokenizer}")
    summary = finetune_rm(load_recipe(RMRecipe, recipe, overrides), model, resume=resume)
    val = f", held-out loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""
    typer.echo(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}{val}, "
               f"model at {summary['model_dir']}")


@finetune.command("grpo")
def grpo_command(
    args: list[str] = typer.Argument(None, metavar="[MODEL] [SECTION.KEY=VALUE]...",
                                     help="the model to start from (lmforge checkpoint dir, HF dir or .gguf; default: "
                                          "the bundled SmolLM2-135M-Instruct GGUF) and overrides, e.g. "
                                          "grpo.group_size=8 grpo.beta=0.04 grpo.aggregation=dr_grpo"),
    recipe: Path = typer.Option(RECIPES / "grpo-tiny.yaml", "--recipe", "-r", help="YAML recipe"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in train.out"),
    tokenizer: str = tokenizer_option(),
    model_opt: str = model_alias(),
):
    """GRPO on generated arithmetic with an exact-match reward: every update samples grpo.group_size
    completions per prompt through the serving engine with the current weights; writes train.out/model."""
    from lmforge.align.grpo import GRPORecipe, finetune_grpo
    from lmforge.config import load_recipe

    model, overrides = model_and_overrides(args, model_opt)
    if tokenizer:
        overrides.append(f"grpo.tokenizer={tokenizer}")
    summary = finetune_grpo(load_recipe(GRPORecipe, recipe, overrides), model, resume=resume)
    typer.echo(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, model at {summary['model_dir']}")


def register(app: typer.Typer) -> None:
    app.add_typer(finetune, name="finetune")
