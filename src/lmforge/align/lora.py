"""LoRA and QLoRA adapters on lmforge's Transformer, saved in the PEFT layout.

y = base(x) + scaling * B(A(dropout(x))), with A [r, in] Kaiming-uniform (as nn.Linear and peft
initialise it) and B [out, r] zero, so a freshly applied adapter changes no output bit.
scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023: keeps the update's scale
stable as r grows).

The base stays frozen and is shared: `adapters_disabled(model)` turns every adapter off, which
makes the same weights the reference model of DPO/PPO/GRPO without a second copy.

Files (what `peft.PeftModel.from_pretrained` reads): adapter_config.json and
adapter_model.safetensors, keys `base_model.model.<HF name>.lora_A.weight` / `.lora_B.weight`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.quant.nf4 import NF4Linear
from lmforge.errors import LmforgeError
from lmforge.model.hf import from_hf_key, to_hf_key
from lmforge.outputs import commit_output_dir, new_output_dir

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
QUANTIZATIONS = (None, "nf4")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False
    quantize_base: str | None = None

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise LmforgeError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise LmforgeError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise LmforgeError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if (isinstance(self.target_modules, str) or not self.target_modules
                or not all(isinstance(t, str) and t for t in self.target_modules)):
            raise LmforgeError(f"LoRA target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        if self.quantize_base not in QUANTIZATIONS:
            raise LmforgeError(f"quantize_base must be one of {QUANTIZATIONS}, got {self.quantize_base!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoraLinear(nn.Module):
    """A frozen linear layer (nn.Linear or NF4Linear) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, cfg: LoraConfig):
        super().__init__()
        self.base_layer = base
        self.scaling = cfg.scaling
        weight = base.weight if isinstance(base, nn.Linear) else None
        # Adapters of a half-precision or quantised base train in fp32 (as peft does).
        dtype = torch.float32 if weight is None or weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        device = base.packed.device if weight is None else weight.device
        self.lora_A = nn.Linear(base.in_features, cfg.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(cfg.r, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.disabled or self.merged:
            return out
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.dropout(x.to(a.dtype)))) * self.scaling
        return out + update.to(out.dtype)

    def _check_mergeable(self) -> None:
        if not isinstance(self.base_layer, nn.Linear):
            raise LmforgeError("cannot merge a LoRA adapter into an NF4-quantised base; "
                               "load the base unquantised to merge")

    @torch.no_grad()
    def merge(self) -> None:
        self._check_mergeable()
        if not self.merged:
            w = self.base_layer.weight
            w.add_(self.delta_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.sub_(self.delta_weight().to(w.dtype))
            self.merged = False


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: list[str] | None = None, use_rslora: bool = False,
               quantize_base: str | None = None) -> nn.Module:
    """Freeze every parameter of `model`, wrap its linear layers named in `target_modules` (the last
    component(s) of the module name, as in peft) with LoRA adapters, in place; returns `model`.
    quantize_base="nf4" stores the wrapped layers' base weights in NF4 (QLoRA)."""
    cfg = LoraConfig(r, alpha, dropout, list(target_modules or DEFAULT_TARGETS), use_rslora, quantize_base)
    cfg.validate()
    if lora_layers(model):
        raise LmforgeError("this model already has LoRA adapters")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = [name for name in linears if _matches(name, cfg.target_modules)]
    if not chosen:
        known = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise LmforgeError(f"no linear layer matches target_modules {cfg.target_modules}; layers are named {known}")
    if any(name == "lm_head" for name in chosen):
        raise LmforgeError("LoRA on lm_head is not supported (the fused loss and tied embeddings read its weight)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = linears[name]
        if cfg.quantize_base == "nf4":
            base = NF4Linear(base)
        setattr(parent, child, LoraLinear(base, cfg))
    model.lora_config = cfg
    return model


def _config_of(model: nn.Module) -> LoraConfig:
    cfg = getattr(model, "lora_config", None)
    if cfg is None or not lora_layers(model):
        raise LmforgeError("this model has no LoRA adapters (call apply_lora first)")
    return cfg


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight, in place (unmerge undoes it up to rounding)."""
    _config_of(model)
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    _config_of(model)
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapters and put the plain nn.Linear layers back: a model lmforge.model.save writes."""
    merge(model)
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    del model.lora_config
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the frozen base alone (the reference model): every adapter off inside the block.
    Merged adapters are unmerged for the block and merged again after it."""
    _config_of(model)
    layers = list(lora_layers(model).values())
    remerge = [layer for layer in layers if layer.merged]
    previous = [layer.disabled for layer in layers]
    for layer in remerge:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was
        for layer in remerge:
            layer.merge()


# --- PEFT files -----------------------------------------------------------------------------------
def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under peft's names (HF module path, no adapter name)."""
    state = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            key = PEFT_PREFIX + to_hf_key(f"{name}.{part}.weight")
            state[key] = getattr(layer, part).weight.detach().float().contiguous().cpu()
    return state


def peft_config(cfg: LoraConfig, base_model_name_or_path: str | None) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "target_modules": list(cfg.target_modules),
            "use_rslora": cfg.use_rslora, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path}


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (the PEFT layout), atomically."""
    cfg = _config_of(model)
    if any(layer.merged for layer in lora_layers(model).values()):
        raise LmforgeError("unmerge the adapters before saving them (the base weights hold them now)")
    tmp = new_output_dir(path, "adapter", overwrite)
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(cfg, base_model_name_or_path), indent=2))
        save_file(peft_state_dict(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_output_dir(tmp, path, "adapter")


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    file = Path(path) / CONFIG_FILE
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise LmforgeError(f"{path}: not an adapter folder (no {CONFIG_FILE})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{file}: unreadable ({e})") from e
    if raw.get("peft_type") != "LORA":
        raise LmforgeError(f"{file}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        raise LmforgeError(f"{file}: target_modules given as a regex ({targets!r}) is not supported; list the names")
    if raw.get("bias", "none") != "none" or raw.get("use_dora") or raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise LmforgeError(f"{file}: bias, DoRA and per-layer rank/alpha patterns are not supported")
    cfg = LoraConfig(raw.get("r"), raw.get("lora_alpha"), raw.get("lora_dropout", 0.0), targets,
                     bool(raw.get("use_rslora", False)))
    cfg.validate()
    return cfg


def load_adapter(model: nn.Module, path: str | os.PathLike, quantize_base: str | None = None) -> nn.Module:
    """Apply the adapter saved at `path` (by lmforge or by peft) to `model` (the base), in place.
    Everything is checked against the model before it is touched."""
    cfg = read_adapter_config(path)
    try:
        state = load_file(Path(path) / WEIGHTS_FILE)
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"{path}: unreadable {WEIGHTS_FILE} ({e})") from e
    # peft writes no adapter name into the file; older versions and other tools may ('.default').
    ours = {from_hf_key(k.removeprefix(PEFT_PREFIX)).replace(".default.weight", ".weight"): v for k, v in state.items()}
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and _matches(name, cfg.target_modules):
            shapes[f"{name}.lora_A.weight"] = (cfg.r, m.in_features)
            shapes[f"{name}.lora_B.weight"] = (m.out_features, cfg.r)
    missing, unexpected = set(shapes) - set(ours), set(ours) - set(shapes)
    if missing or unexpected:
        raise LmforgeError(f"{path}: adapter weights do not match the model "
                           f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    for name, shape in shapes.items():
        if tuple(ours[name].shape) != shape:
            raise LmforgeError(f"{path}: {name} has shape {tuple(ours[name].shape)}, the model expects {shape}")
    apply_lora(model, cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules, cfg.use_rslora, quantize_base)
    with torch.no_grad():
        for name in shapes:
            model.get_parameter(name).copy_(ours[name])
    return model
