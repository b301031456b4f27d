"""PPO's value head: a scalar nn.Linear(dim, 1) on the policy's final hidden states, read from the
same forward that gives the log-probs (`model(..., return_hidden=True)`; no second trunk).

It is attached to the model as an attribute, so the shared loop optimises and checkpoints it with
the policy; `save_value_head` writes it as value_head.safetensors ({"weight": [1, dim], "bias": [1]}).
Zero-initialised: the first values are 0, so the first advantages are the plain rewards-to-go.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.outputs import atomic_write_bytes

VALUE_HEAD_ATTR = "value_head"
VALUE_HEAD_FILE = "value_head.safetensors"


def attach_value_head(model: nn.Module) -> nn.Linear:
    w = model.lm_head.weight
    head = nn.Linear(w.shape[1], 1, bias=True, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    setattr(model, VALUE_HEAD_ATTR, head)
    return head


def value_head_of(model: nn.Module) -> nn.Linear:
    head = getattr(getattr(model, "_orig_mod", model), VALUE_HEAD_ATTR, None)
    if head is None:
        raise LmforgeError("the PPO objective's model has no value head (prepare_model attaches it)")
    return head


def detach_value_head(model: nn.Module) -> nn.Linear:
    head = value_head_of(model)
    delattr(model, VALUE_HEAD_ATTR)
    return head


def save_value_head(directory: str | Path, head: nn.Linear) -> Path:
    """Write the head as directory/value_head.safetensors, atomically."""
    path = Path(directory) / VALUE_HEAD_FILE
    tmp = path.with_name(path.name + ".tmp")
    save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
              str(tmp))
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()
    return path
