"""The options every model-running command takes, spelled once: `[MODEL]`, `-t/--tokenizer`,
`--dtype`, `--device` (and the old `-m/--model`, kept hidden so existing scripts still work)."""
from __future__ import annotations

import typer

from lmforge.errors import LmforgeError
from lmforge.model.pretrained import DEVICE_HELP, DTYPE_HELP

MODEL_HELP = "lmforge checkpoint dir, Hugging Face dir or .gguf file"
DEFAULT_MODEL_HELP = MODEL_HELP + " (default: the bundled SmolLM2-135M-Instruct GGUF)"


def model_argument(required: bool = False):
    return typer.Argument(None, metavar="[MODEL]", help=MODEL_HELP if required else DEFAULT_MODEL_HELP,
                          show_default=False)


def model_alias():
    return typer.Option(None, "--model", "-m", hidden=True, help="old spelling of the MODEL argument")


def tokenizer_option():
    return typer.Option(None, "--tokenizer", "-t", help="tokenizer.json, tokenizer dir or .gguf (default: the model's)")


def dtype_option():
    return typer.Option("auto", "--dtype", help=DTYPE_HELP)


def device_option():
    return typer.Option("auto", "--device", help=DEVICE_HELP)


def pick_model(positional: str | None, alias: str | None) -> str | None:
    """MODEL given as the argument or through the hidden --model alias (not two different ones)."""
    if positional is not None and alias is not None and positional != alias:
        raise LmforgeError(f"two models given ({positional!r} and --model {alias!r}); give one MODEL")
    return positional if positional is not None else alias
