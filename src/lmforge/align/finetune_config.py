"""The `lora` section shared by the finetune recipes (SFT, DPO, RM), and the objective hooks that
apply it inside the training loop.

`lora.r: 0` (the default) is a full finetune. With r > 0, `prepare_model` freezes the starting
weights and wraps the target layers with LoRA adapters (QLoRA with quantize_base: nf4) before the
loop builds its optimizer, so only the adapters train; `finish_model` writes the adapter in the PEFT
layout to train.out/adapter and hands the loop the merged plain model for train.out/model. With
QLoRA the merged model is the dequantised NF4 base plus the adapter: what the trained model
computed (the adapter itself also applies to the original unquantised base, as QLoRA adapters do).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmforge.align.lora import (
    DEFAULT_TARGETS,
    apply_lora,
    lora_layers,
    merge_and_unload,
    save_adapter,
)
from lmforge.quant.nf4 import NF4Linear
from lmforge.config import check_choice, require

ADAPTER_DIR = "adapter"
BASE_QUANTIZATIONS = ("none", "nf4")


@dataclass
class LoraSettings:
    r: int = 0                  # adapter rank; 0 = full finetune (every weight trains)
    alpha: float = 16.0         # scaling = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0        # on the adapter's input only
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rslora: bool = False
    quantize_base: str = "none"  # none | nf4 (QLoRA: the frozen wrapped weights stored in NF4)

    def __post_init__(self):
        require(self.r >= 0, "lora.r", ">= 0 (0 = full finetune)", self.r)
        require(self.alpha > 0, "lora.alpha", "> 0", self.alpha)
        require(0 <= self.dropout < 1, "lora.dropout", "in [0, 1)", self.dropout)
        require(bool(self.target_modules) and all(isinstance(t, str) and t for t in self.target_modules),
                "lora.target_modules", "a non-empty list of layer names", self.target_modules)
        check_choice(self, "lora", "quantize_base", BASE_QUANTIZATIONS)
        require(self.r > 0 or self.quantize_base == "none", "lora.quantize_base",
                "none when lora.r is 0 (a quantised base cannot be finetuned in full)", self.quantize_base)

    @property
    def enabled(self) -> bool:
        return self.r > 0


class LoraHooks:
    """Mixed into an objective: the loop calls prepare_model after loading the starting weights and
    finish_model after the last step. Set `lora` (and `base_model`, recorded in adapter_config.json)."""
    lora: LoraSettings | None = None
    base_model: str | None = None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        s = self.lora
        if s is None or not s.enabled:
            return model
        return apply_lora(model, s.r, s.alpha, s.dropout, s.target_modules, s.rslora,
                          None if s.quantize_base == "none" else s.quantize_base)

    def finish_model(self, model: nn.Module, out: Path) -> tuple[nn.Module, dict[str, Path]]:
        """-> (the plain model to save as out/model, extra files to copy into that folder)."""
        if lora_layers(model):
            save_adapter(model, out / ADAPTER_DIR, self.base_model)
            dequantize_bases(model)
            model = merge_and_unload(model)
        return model, {}


@torch.no_grad()
def dequantize_bases(model: nn.Module) -> None:
    """Replace every NF4 base under a LoRA layer by the plain nn.Linear it stands for, so it can merge."""
    for layer in lora_layers(model).values():
        base = layer.base_layer
        if isinstance(base, NF4Linear):
            weight = base.dequantized_weight()
            plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                              device=weight.device, dtype=weight.dtype)
            plain.weight.copy_(weight)
            if base.bias is not None:
                plain.bias.copy_(base.bias)
            plain.requires_grad_(False)
            layer.base_layer = plain
