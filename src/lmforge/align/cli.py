"""`lmforge finetune`: post-training commands (`sft`, `dpo`, `rm`, `grpo`, `ppo`), each a recipe plus key=value overrides."""
from __future__ import annotations

import importlib
from pathlib import Path

import typer

from lmforge.errors import LmforgeError
from lmforge.model.cli_options import model_alias, pick_model, tokenizer_option

RECIPES = Path(__file__).parents[1] / "recipes"
finetune = typer.Typer(help="Post-train a model: supervised finetuning, DPO, reward models, GRPO, PPO.", no_args_is_help=True)

# command -> (module, recipe class, function); the recipe's section for the objective is named like the command
KINDS = {
    "sft": ("lmforge.align.sft", "SFTRecipe", "finetune_sft"),
    "dpo": ("lmforge.align.dpo", "DPORecipe", "finetune_dpo"),
    "rm": ("lmforge.align.reward_model", "RMRecipe", "finetune_rm"),
    "grpo": ("lmforge.align.grpo", "GRPORecipe", "finetune_grpo"),
    "ppo": ("lmforge.align.ppo", "PPORecipe", "finetune_ppo"),
}


def model_and_overrides(args: list[str] | None, model_opt: str | None) -> tuple[str | None, list[str]]:
    """[MODEL] [SECTION.KEY=VALUE]... -> (MODEL or None, overrides): an argument with '=' is an
    override unless it names an existing path."""
    models = [a for a in args or [] if "=" not in a or Path(a).exists()]
    if len(models) > 1:
        raise LmforgeError(f"more than one MODEL given: {', '.join(models)}")
    return pick_model(models[0] if models else None, model_opt), [a for a in args or [] if a not in models]


def run_finetune(kind: str, args: list[str] | None, recipe: Path, resume: bool, tokenizer: str | None,
                 model_opt: str | None) -> None:
    from lmforge.config import load_recipe

    module, recipe_class, function = KINDS[kind]
    mod = importlib.import_module(module)
    model, overrides = model_and_overrides(args, model_opt)
    if tokenizer:
        overrides.append(f"{kind}.tokenizer={tokenizer}")
    summary = getattr(mod, function)(load_recipe(getattr(mod, recipe_class), recipe, overrides), model, resume=resume)
    val = f", held-out loss {summary['val_loss']:.4f}" if summary.get("val_loss") is not None else ""
    typer.echo(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}{val}, "
               f"model at {summary['model_dir']}")


def args_argument(examples: str):
    return typer.Argument(None, metavar="[MODEL] [SECTION.KEY=VALUE]...",
                          help="the model to start from (lmforge checkpoint dir, HF dir or .gguf; default: the "
                               f"bundled SmolLM2-135M-Instruct GGUF) and overrides, e.g. {examples}")


def recipe_option(kind: str):
    return typer.Option(RECIPES / f"{kind}-tiny.yaml", "--recipe", "-r", help="YAML recipe")


def resume_option():
    return typer.Option(False, "--resume", help="continue from the latest checkpoint in train.out")


@finetune.command("sft")
def sft_command(args: list[str] = args_argument("train.lr=1e-4 sft.data=chats.jsonl lora.r=8"),
                recipe: Path = recipe_option("sft"), resume: bool = resume_option(),
                tokenizer: str = tokenizer_option(), model_opt: str = model_alias()):
    """Supervised finetuning: loss on assistant tokens only; writes train.out/model (weights + tokenizer)."""
    run_finetune("sft", args, recipe, resume, tokenizer, model_opt)


@finetune.command("dpo")
def dpo_command(args: list[str] = args_argument("dpo.beta=0.1 dpo.loss_type=ipo dpo.data=pairs.jsonl"),
                recipe: Path = recipe_option("dpo"), resume: bool = resume_option(),
                tokenizer: str = tokenizer_option(), model_opt: str = model_alias()):
    """Direct Preference Optimisation on prompt/chosen/rejected pairs; reference log-probs computed once
    from the starting weights and cached in train.out (or the adapters switched off, with LoRA)."""
    run_finetune("dpo", args, recipe, resume, tokenizer, model_opt)


@finetune.command("rm")
def rm_command(args: list[str] = args_argument("rm.margin=0.5 rm.data=pairs.jsonl"),
               recipe: Path = recipe_option("rm"), resume: bool = resume_option(),
               tokenizer: str = tokenizer_option(), model_opt: str = model_alias()):
    """Bradley-Terry reward model on prompt/chosen/rejected pairs (a scalar head on the last token's
    hidden state); writes train.out/model with reward_head.safetensors."""
    run_finetune("rm", args, recipe, resume, tokenizer, model_opt)


@finetune.command("grpo")
def grpo_command(args: list[str] = args_argument("grpo.group_size=8 grpo.beta=0.04 grpo.aggregation=dr_grpo"),
                 recipe: Path = recipe_option("grpo"), resume: bool = resume_option(),
                 tokenizer: str = tokenizer_option(), model_opt: str = model_alias()):
    """GRPO on generated arithmetic with an exact-match reward: every update samples grpo.group_size
    completions per prompt through the serving engine with the current weights; writes train.out/model."""
    run_finetune("grpo", args, recipe, resume, tokenizer, model_opt)


@finetune.command("ppo")
def ppo_command(args: list[str] = args_argument("ppo.beta=0.1 ppo.kl_estimator=k3 ppo.reward_model=runs/rm/model"),
                recipe: Path = recipe_option("ppo"), resume: bool = resume_option(),
                tokenizer: str = tokenizer_option(), model_opt: str = model_alias()):
    """PPO on generated arithmetic prompts: rollouts through the serving engine, reward from exact match
    or a trained reward model (ppo.reward_model), a value head on the policy's hidden states, GAE,
    clipped losses and a KL penalty to the frozen start; writes train.out/model."""
    run_finetune("ppo", args, recipe, resume, tokenizer, model_opt)


def register(app: typer.Typer) -> None:
    app.add_typer(finetune, name="finetune")
