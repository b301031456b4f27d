"""Kernel-specific copies of weights (oneDNN's blocked layouts), made on first use and kept outside
the module: they are a property of the CPU kernel, not of the model, so they are never saved, and
a weight changed in place (load_state_dict, an optimiser step) is packed again."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

_PACKED = WeakIdKeyDictionary()   # weight tensor -> (its _version when packed, the packed form)


def prepacked(weight: torch.Tensor, pack: Callable[[torch.Tensor], object]):
    """pack(weight), computed once per weight and again whenever the weight has been modified."""
    version = _version(weight)
    entry = _PACKED.get(weight)
    if entry is None or entry[0] != version:
        entry = (version, pack(weight))
        _PACKED[weight] = entry
    return entry[1]


def _version(t: torch.Tensor) -> int:
    # Tensors made under inference_mode keep no version counter: packed once, never refreshed.
    return -1 if t.is_inference() else t._version
