"""`lmforge convert` (`lmforge generate` runs through the serving engine: see serve/cli.py)."""
from __future__ import annotations

from pathlib import Path

import typer

from lmforge.errors import LmforgeError


def convert_command(
    src: str = typer.Argument(..., help="model to read (any format lmforge.model.load accepts)"),
    dst: Path = typer.Argument(..., help="directory to write"),
    to: str = typer.Option("hf", help="hf (config.json + safetensors) or lmforge"),
    max_shard_mb: int = typer.Option(0, help="shard HF safetensors above this size (0: one file)"),
):
    """Convert between lmforge checkpoints, Hugging Face directories and GGUF (read only)."""
    from lmforge.model import load, save, save_hf

    model = load(src)
    if to == "hf":
        save_hf(model, dst, max_shard_bytes=max_shard_mb * 2**20 or None)
    elif to == "lmforge":
        save(model, dst)
    else:
        raise LmforgeError(f"--to must be 'hf' or 'lmforge', got {to!r}")
    typer.echo(f"wrote {dst}")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert_command)
