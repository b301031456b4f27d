"""One entry point: quantise a model in place with a named method, recording what was done in
`model.quantization` (saved as lmforge_quant.json by lmforge.model.save, read back by load).

Methods: int8 (per-channel, every linear including the LM head), smoothquant (int8 weights and
int8 activations, every linear, calibrated; lmforge.quant.smoothquant), rtn / awq / gptq (group-wise
4-bit codes for the decoder blocks' linears), nf4 (NF4 + double quantisation, blocks of 64).
The 4-bit methods keep the LM head in int8 by default: it is the largest matrix (49152 x 576 on
SmolLM2), the one most sensitive to rounding, and int8 keeps it close to float. `head_bits=4` puts
it on the body's 4-bit grid instead (RTN; llama.cpp's Q4_0 files do the same with the tied
embedding), halving the bytes the head reads per decoded token. The embedding stays float.
"""
from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.quant.groupwise import check_grid, group_params, int4_linear, quantize_with, rtn_linear
from lmforge.quant.int8 import int8_linear, linear_targets, quantize_int8, replace_module
from lmforge.quant.smoothquant import DEFAULT_ALPHA, quantize_smoothquant

METHODS = ("int8", "smoothquant", "rtn", "awq", "gptq", "nf4")
CALIBRATED = ("smoothquant", "awq", "gptq")
GROUPWISE = ("rtn", "awq", "gptq")   # the methods with a group-wise grid (bits, group size, asym)
HEAD = "lm_head"


@torch.no_grad()
def quantize_model(model, method: str, *, bits: int = 4, group_size: int = 128, asym: bool = False,
                   calibration: torch.Tensor | None = None, act_order: bool = False, head_bits: int = 8,
                   alpha: float = DEFAULT_ALPHA):
    """Quantise `model` in place; `calibration` [n, T] token ids are required by the CALIBRATED
    methods; `alpha` is smoothquant's migration strength."""
    if method not in METHODS:
        raise LmforgeError(f"unknown quantisation method {method!r}; choose one of {', '.join(METHODS)}")
    if getattr(model, "quantization", None):
        raise LmforgeError("this model is already quantised")
    if method == "int8":
        return quantize_int8(model)
    if method in GROUPWISE:
        check_grid(bits, group_size)
    check_head_bits(method, head_bits)
    if method in CALIBRATED and calibration is None:
        raise LmforgeError(f"{method} needs calibration tokens")
    if method == "smoothquant":
        return quantize_smoothquant(model, calibration, alpha)
    body = [(name, mod) for name, mod in linear_targets(model, skip=(HEAD,))]
    if method == "nf4":
        from lmforge.quant.nf4 import BLOCK, nf4_int4_linear
        new = {name: nf4_int4_linear(mod) for name, mod in body}
        kind = {"format": "nf4", "group_size": BLOCK}
    elif method == "rtn":
        new = {name: rtn_linear(mod, bits, group_size, asym) for name, mod in body}
        kind = {"format": "int4", "group_size": group_size}
    else:
        new = _calibrated(model, method, calibration, bits, group_size, asym, act_order)
        kind = {"format": "int4", "group_size": group_size}
    for name, layer in new.items():
        replace_module(model, name, layer)
    layers = {name: dict(kind) for name in new}
    head = model.get_submodule(HEAD)
    if isinstance(head, nn.Linear) and head_bits == 4:
        replace_module(model, HEAD, rtn_linear(head, 4, group_size, asym))
        layers[HEAD] = {"format": "int4", "group_size": group_size}
    elif isinstance(head, nn.Linear):
        replace_module(model, HEAD, int8_linear(head))
        layers[HEAD] = {"format": "int8"}
    settings = {"bits": bits, "group_size": group_size, "asym": asym, "head_bits": head_bits} if method != "nf4" else {}
    if method == "gptq":
        settings["act_order"] = act_order
    model.quantization = {"method": method, **settings, "layers": layers}
    return model


def check_head_bits(method: str, head_bits: int) -> None:
    if head_bits not in (4, 8):
        raise LmforgeError(f"--head-bits must be 8 (int8 per channel) or 4 (RTN on the body's groups), got {head_bits}")
    if head_bits == 4 and method not in GROUPWISE:
        raise LmforgeError(f"--head-bits 4 goes with the {', '.join(GROUPWISE)} methods, not {method}")


def _calibrated(model, method, calibration, bits, group_size, asym, act_order) -> dict[str, nn.Module]:
    """Block by block: AWQ folds its scales and picks clip ratios, GPTQ runs its column loop; each
    block's weights are replaced by their dequantised values so the next block calibrates on the
    quantised model's activations, and the codes are kept for the Int4Linear layers."""
    from lmforge.quant.awq import awq_block
    from lmforge.quant.calibration import blockwise
    from lmforge.quant.gptq import gptq, hessian
    new = {}

    def quantize_block(i: int, block: nn.Module, inputs: dict) -> None:
        clips = awq_block(block, inputs, model.cfg, bits, group_size, asym) if method == "awq" else None
        for name, lin in block.named_modules():
            if not isinstance(lin, nn.Linear):
                continue
            w = lin.weight.float()
            if method == "awq":
                scale, zero = group_params(w, bits, group_size, asym, clips[name])
                q = quantize_with(w, scale, zero, bits, group_size)
            else:
                q, scale, zero = gptq(w, hessian(inputs[name]), bits, group_size, asym, act_order)
            layer = int4_linear(q, scale, zero, group_size, lin.weight.device)
            lin.weight.copy_(layer.dequantized().to(lin.weight.dtype))
            new[f"layers.{i}.{name}"] = layer

    blockwise(model, calibration, quantize_block)
    return new
