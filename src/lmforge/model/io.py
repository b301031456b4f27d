"""One loader for every model source, and the two writers (lmforge checkpoint, HF directory).

An lmforge checkpoint is a directory holding `lmforge_model.json` (the exact ModelConfig) and
`model.safetensors` (our parameter names); a Hugging Face directory holds `config.json`.
A quantised lmforge checkpoint (`lmforge quantize`) also holds `lmforge_quant.json`: how it was
quantised and, per quantised linear layer, its storage format (lmforge.model.quantized); its
safetensors hold that layer's codes and scales in place of the float weight.
Weights are only ever read from safetensors (or GGUF), never unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.hf import (config_from_hf, config_to_hf, from_hf_key, read_safetensors_dir,
                              to_hf_key, write_safetensors_dir)
from lmforge.model.layers import rope_inv_freq
from lmforge.model.quantized import swap_in_quantized
from lmforge.model.transformer import Transformer
from lmforge.outputs import commit_output_dir, new_output_dir

LMFORGE_CONFIG = "lmforge_model.json"
QUANT_CONFIG = "lmforge_quant.json"


def state_for_saving(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict without the tied head (safetensors refuses shared storage; loaders re-tie)."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], where, dtype=None, device=None,
                     quantization: dict | None = None):
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device or "cpu")
    model.inv_freq = rope_inv_freq(cfg).to(model.inv_freq.device)  # buffers are not in the file
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    if quantization:
        swap_in_quantized(model, quantization.get("layers", {}))
        model.quantization = quantization
    expected = set(state_for_saving(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise LmforgeError(f"{where}: weights do not match the config "
                           f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in state.items():
        target = targets[name]
        if target.shape != tensor.shape:
            raise LmforgeError(f"{where}: {name} has shape {tuple(tensor.shape)}, config expects {tuple(target.shape)}")
        if target.is_floating_point() != tensor.is_floating_point():
            raise LmforgeError(f"{where}: {name} is {tensor.dtype}, the model expects {target.dtype}")
        with torch.no_grad():
            target.copy_(tensor)
    if device is not None:
        model.to(device)
    if dtype is not None:
        model.to(dtype)   # floating tensors only: quantised codes keep their integer dtype
    return model.eval()


def read_quant_config(path: Path) -> dict | None:
    file = path / QUANT_CONFIG
    if not file.exists():
        return None
    try:
        spec = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{file}: corrupt JSON ({e})") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("layers", {}), dict):
        raise LmforgeError(f"{file}: expected an object with a 'layers' object")
    return spec


def load(ref: str | os.PathLike, dtype: torch.dtype | None = None, device=None, *,
         gguf_int4: bool = False) -> Transformer:
    """Load a model from an lmforge checkpoint dir, a Hugging Face Llama dir, or a .gguf file.
    gguf_int4 keeps a GGUF's Q4_0/Q4_1 matrices as int4 layers (as stored) instead of dequantising."""
    path = Path(ref)
    if not path.exists():
        raise LmforgeError(f"model not found: {ref}")
    if gguf_int4 and path.suffix != ".gguf":
        raise LmforgeError(f"{ref}: keeping GGUF int4 blocks needs a .gguf file")
    if path.suffix == ".gguf":
        from lmforge.model.gguf import read_gguf_model  # optional dependency path
        cfg, state, quantization = read_gguf_model(path, keep_int4=gguf_int4)
        return model_from_state(cfg, state, path, dtype, device, quantization)
    if (path / LMFORGE_CONFIG).exists():
        try:
            cfg = ModelConfig.from_dict(json.loads((path / LMFORGE_CONFIG).read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise LmforgeError(f"{path / LMFORGE_CONFIG}: corrupt config ({e})") from e
        return model_from_state(cfg, read_safetensors_dir(path), path, dtype, device, read_quant_config(path))
    if (path / "config.json").exists():
        try:
            hf = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path / 'config.json'}: corrupt JSON ({e})") from e
        cfg = config_from_hf(hf)
        state = {from_hf_key(k): v for k, v in read_safetensors_dir(path).items()}
        return model_from_state(cfg, state, path, dtype, device)
    raise LmforgeError(f"{ref}: not an lmforge checkpoint, Hugging Face directory or .gguf file")


def write_model_files(model: Transformer, directory: Path) -> None:
    """The model part of an lmforge checkpoint, into an existing directory (not atomic by itself)."""
    (directory / LMFORGE_CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2))
    quantization = getattr(model, "quantization", None)
    if quantization:
        (directory / QUANT_CONFIG).write_text(json.dumps(quantization, indent=2))
    write_safetensors_dir(state_for_saving(model), directory)


def _add_extras(tmp: Path, tokenizer, extra_files: dict[str, Path] | None) -> None:
    if tokenizer is not None:  # a self-contained directory: generate/serve/AutoTokenizer need no flags
        tokenizer.write_files(tmp)
    for name, src in (extra_files or {}).items():
        shutil.copy(src, tmp / name)


def save(model: Transformer, path: str | os.PathLike, extra_files: dict[str, Path] | None = None,
         tokenizer=None, overwrite: bool = False) -> Path:
    """Write an lmforge checkpoint directory atomically (see lmforge.outputs for what is replaced).
    `tokenizer` (an lmforge Tokenizer) is written alongside, so the directory stands alone."""
    tmp = new_output_dir(path, "model", overwrite)
    try:
        write_model_files(model, tmp)
        _add_extras(tmp, tokenizer, extra_files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_output_dir(tmp, path, "model")


def generation_config(model: Transformer, tokenizer) -> dict:
    conf = {"max_length": model.cfg.max_seq_len}
    if tokenizer is not None:
        stops = sorted(tokenizer.stop_ids())
        if tokenizer.eos_id is not None:  # HF reads the first eos id as the pad default too
            stops = [tokenizer.eos_id] + [i for i in stops if i != tokenizer.eos_id]
        conf.update({"eos_token_id": stops[0] if len(stops) == 1 else stops,
                     **({"bos_token_id": tokenizer.bos_id} if tokenizer.bos_id is not None else {})})
    return conf


def save_hf(model: Transformer, path: str | os.PathLike, max_shard_bytes: int | None = None,
            extra_config: dict | None = None, extra_files: dict[str, Path] | None = None,
            tokenizer=None, overwrite: bool = False) -> Path:
    """Write a Hugging Face Llama directory (config.json + safetensors, sharded if large, and with a
    tokenizer: tokenizer files + generation_config.json), atomically."""
    if getattr(model, "quantization", None):
        raise LmforgeError("a quantised model has no Hugging Face Llama form; save it as an lmforge checkpoint")
    hf_config = config_to_hf(model.cfg, extra_config)
    tmp = new_output_dir(path, "model", overwrite)
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        write_safetensors_dir({to_hf_key(k): v for k, v in state_for_saving(model).items()}, tmp, max_shard_bytes)
        if tokenizer is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config(model, tokenizer), indent=2))
        _add_extras(tmp, tokenizer, extra_files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_output_dir(tmp, path, "model")
