"""`lmforge quantize` (a quantised lmforge checkpoint) and `lmforge export gguf` (a GGUF file)."""
from __future__ import annotations

from pathlib import Path

import typer

from lmforge.errors import LmforgeError
from lmforge.model.cli_options import model_argument, tokenizer_option
from lmforge.quant.smoothquant import DEFAULT_ALPHA

METHOD_HELP = ("int8 (per channel), smoothquant (int8 weights and activations), rtn (group-wise round to "
               "nearest), awq or gptq (smoothquant, awq and gptq calibrate on the stdlib train split), "
               "nf4 (NF4 + double quantisation)")


def quantize_command(
    model: str = model_argument(),
    method: str = typer.Option(..., "--method", help=METHOD_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="checkpoint folder to write (lmforge.model.load reads it)"),
    bits: int = typer.Option(4, help="bits per weight for rtn/awq/gptq (2, 3 or 4; stored as 4-bit codes)"),
    group_size: int = typer.Option(128, help="inputs per scale for rtn/awq/gptq: 32, 64, 128 or 256"),
    asym: bool = typer.Option(False, "--asym", help="asymmetric grid (a zero point per group)"),
    act_order: bool = typer.Option(False, "--act-order", help="gptq: quantise the most active inputs first"),
    head_bits: int = typer.Option(8, "--head-bits", help="rtn/awq/gptq: LM head in int8 (8, per channel) or on "
                                                         "the body's 4-bit grid (4, RTN; as llama.cpp's Q4_0)"),
    alpha: float = typer.Option(DEFAULT_ALPHA, min=0.0, max=1.0, help="smoothquant: share of the activations' range moved "
                                                            "into the weights"),
    calibration_samples: int = typer.Option(16, min=1, max=4096, help="smoothquant/awq/gptq: calibration sequences"),
    calibration_len: int = typer.Option(256, min=16, max=65536,
                                        help="smoothquant/awq/gptq: tokens per calibration sequence"),
    tokenizer: str = tokenizer_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="also write into a non-empty folder that is not an "
                                                              "lmforge output (its other files are kept)"),
):
    """Quantise a model's weights and write a checkpoint that `lmforge serve` and `generate` load directly."""
    from lmforge.model import load_pretrained, save
    from lmforge.outputs import check_destination
    from lmforge.quant.apply import CALIBRATED, GROUPWISE, METHODS, check_head_bits, quantize_model
    from lmforge.quant.groupwise import check_grid

    if method not in METHODS:
        raise LmforgeError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method in GROUPWISE:
        check_grid(bits, group_size)
    check_head_bits(method, head_bits)
    check_destination(out, "model", overwrite)   # before the (slow) load
    loaded = load_pretrained(model, tokenizer, dtype="float32", device="cpu")
    calibration = None
    if method in CALIBRATED:
        from lmforge.quant.calibration import calibration_batch
        calibration = calibration_batch(loaded.tokenizer, calibration_samples,
                                        min(calibration_len, loaded.model.cfg.max_seq_len))
    quantize_model(loaded.model, method, bits=bits, group_size=group_size, asym=asym,
                   calibration=calibration, act_order=act_order, head_bits=head_bits, alpha=alpha)
    save(loaded.model, out, tokenizer=loaded.tokenizer, overwrite=overwrite)
    typer.echo(f"wrote {out} ({method})")


export_app = typer.Typer(help="Write a model in another program's format.", no_args_is_help=True)


@export_app.command("gguf")
def export_gguf_command(
    model: str = model_argument(),
    out: Path = typer.Option(..., "--out", "-o", help="the .gguf file to write"),
    kind: str = typer.Option("f16", "--type", help="f16, q8_0, q4_0 or q4_k (q4_k: matrices whose rows "
                            "are whole 256-value super-blocks; the others q4_0)"),
    tokenizer: str = tokenizer_option(),
):
    """Export a Llama model (lmforge or Hugging Face, float) with its tokenizer and chat template to GGUF."""
    from lmforge.model import load_pretrained
    from lmforge.quant.gguf_export import TYPES, export_gguf

    if kind not in TYPES:
        raise LmforgeError(f"--type must be one of {', '.join(TYPES)}, got {kind!r}")
    if out.suffix != ".gguf":
        raise LmforgeError(f"--out must name a .gguf file, got {str(out)!r}")
    if out.exists() and not out.is_file():
        raise LmforgeError(f"{out} exists and is not a file")
    if not out.parent.is_dir():
        raise LmforgeError(f"folder {out.parent} does not exist")
    loaded = load_pretrained(model, tokenizer, dtype="float32", device="cpu")
    export_gguf(loaded.model, loaded.tokenizer, out, kind, name=loaded.name)
    typer.echo(f"wrote {out} ({kind})")


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)
    app.add_typer(export_app, name="export")
