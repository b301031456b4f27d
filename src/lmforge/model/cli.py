"""`lmforge convert` (`lmforge generate` runs through the serving engine: see serve/cli.py)."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from lmforge.errors import LmforgeError


def load_dcp_checkpoint(step_dir: Path):
    """The weights of a distributed training checkpoint (OUT/ckpt/step_N written by `lmforge train`
    under torchrun: lmforge_model.json + dcp/), read in this one process at their saved dtype."""
    import torch.distributed.checkpoint as dcp

    from lmforge.model import ModelConfig, Transformer
    from lmforge.model.io import LMFORGE_CONFIG

    reader = dcp.FileSystemReader(step_dir / "dcp")
    saved = reader.read_metadata().state_dict_metadata
    cfg = ModelConfig.from_dict(json.loads((step_dir / LMFORGE_CONFIG).read_text()))
    model = Transformer(cfg).to(saved["model.embed_tokens.weight"].properties.dtype)
    target = {"model": model.state_dict()}
    dcp.load(target, storage_reader=reader)
    model.load_state_dict(target["model"])
    return model.eval()


def convert_command(
    src: str = typer.Argument(..., help="model to read (any format lmforge.model.load accepts)"),
    dst: Path = typer.Argument(..., help="directory to write (new, empty, or an earlier lmforge/HF output)"),
    to: str = typer.Option("hf", help="hf (config.json + safetensors) or lmforge"),
    max_shard_mb: int = typer.Option(0, min=0, help="shard HF safetensors above this size (0: one file)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="also write into a non-empty folder that is not an "
                                                              "lmforge output (its other files are kept)"),
):
    """Convert between lmforge checkpoints, Hugging Face directories and GGUF (read only); a
    distributed training checkpoint (a train run's ckpt/step_N with dcp/) is read too.
    The source's tokenizer (a GGUF's own, or the tokenizer files next to the model) is written too."""
    from lmforge.model import load, save, save_hf
    from lmforge.outputs import check_destination
    from lmforge.tokenizer import load_tokenizer

    if to not in ("hf", "lmforge"):
        raise LmforgeError(f"--to must be 'hf' or 'lmforge', got {to!r}")
    check_destination(dst, "model", overwrite)  # before the (slow) load
    source = Path(src)
    model = load_dcp_checkpoint(source) if (source / "dcp" / ".metadata").is_file() else load(src)
    has_tokenizer = source.suffix == ".gguf" or (source.is_dir() and (source / "tokenizer.json").exists())
    tok = load_tokenizer(src) if has_tokenizer else None
    if to == "hf":
        save_hf(model, dst, max_shard_bytes=max_shard_mb * 2**20 or None, tokenizer=tok, overwrite=overwrite)
    else:
        save(model, dst, tokenizer=tok, overwrite=overwrite)
    typer.echo(f"wrote {dst}" + ("" if tok else " (the source has no tokenizer; none written)"))


def register(app: typer.Typer) -> None:
    app.command("convert")(convert_command)
