"""`lmforge generate` and `lmforge convert`."""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from lmforge.errors import LmforgeError


def generate_command(
    model: str = typer.Option(..., "--model", "-m", help="lmforge checkpoint, HF directory or .gguf"),
    prompt: str = typer.Option(..., "--prompt", "-p"),
    tokenizer: str = typer.Option(None, help="tokenizer.json or directory (default: the model's)"),
    max_tokens: int = typer.Option(128, min=1),
    temperature: float = typer.Option(0.8, min=0.0),
    top_k: int = typer.Option(0, min=0),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(None),
    chat: bool = typer.Option(False, help="wrap the prompt in the tokenizer's chat template"),
):
    """Sample a continuation with the KV cache, streaming tokens to stdout."""
    from lmforge.model import load
    from lmforge.model.sampling import generate
    from lmforge.tokenizer import load_tokenizer

    net = load(model)
    tok = load_tokenizer(tokenizer or model)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    ids = tok.encode(text)
    if not ids:
        raise LmforgeError("the prompt encodes to no tokens")
    out: list[int] = []
    printed = ""
    sys.stdout.write(prompt if not chat else "")
    for token in generate(net, ids, max_tokens, temperature, top_k, top_p, seed, tok.stop_ids()):
        out.append(token)
        text = tok.decode(out, skip_special=True)
        if not text.endswith("\ufffd"):  # wait for multi-byte characters to complete
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write("\n")


def convert_command(
    src: str = typer.Argument(..., help="model to read (any format lmforge.model.load accepts)"),
    dst: Path = typer.Argument(..., help="directory to write (new, empty, or an earlier lmforge/HF output)"),
    to: str = typer.Option("hf", help="hf (config.json + safetensors) or lmforge"),
    max_shard_mb: int = typer.Option(0, min=0, help="shard HF safetensors above this size (0: one file)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="also write into a non-empty folder that is not an "
                                                              "lmforge output (its other files are kept)"),
):
    """Convert between lmforge checkpoints, Hugging Face directories and GGUF (read only).
    The source's tokenizer (a GGUF's own, or the tokenizer files next to the model) is written too."""
    from lmforge.model import load, save, save_hf
    from lmforge.outputs import check_destination
    from lmforge.tokenizer import load_tokenizer

    if to not in ("hf", "lmforge"):
        raise LmforgeError(f"--to must be 'hf' or 'lmforge', got {to!r}")
    check_destination(dst, "model", overwrite)  # before the (slow) load
    model = load(src)
    source = Path(src)
    has_tokenizer = source.suffix == ".gguf" or (source.is_dir() and (source / "tokenizer.json").exists())
    tok = load_tokenizer(src) if has_tokenizer else None
    if to == "hf":
        save_hf(model, dst, max_shard_bytes=max_shard_mb * 2**20 or None, tokenizer=tok, overwrite=overwrite)
    else:
        save(model, dst, tokenizer=tok, overwrite=overwrite)
    typer.echo(f"wrote {dst}" + ("" if tok else " (the source has no tokenizer; none written)"))


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
    app.command("convert")(convert_command)
