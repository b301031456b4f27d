"""Kernel-specific copies of weights (oneDNN's blocked layouts), made on first use and kept outside
the module: they are a property of the CPU kernel, not of the model, so they are never saved, and
a weight changed in place (load_state_dict, an optimiser step) is packed again."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

_PACKED = WeakIdKeyDictionary()   # (first) weight -> ((id, _version) of each weight when packed, the packed form)


def prepacked(weights, pack: Callable):
    """pack(weights), for one tensor or a tuple packed as one group: computed once and again whenever
    any of them has been modified. A group is kept under its first tensor, with its members' ids."""
    group = weights if isinstance(weights, tuple) else (weights,)
    stamp = tuple((id(w), _version(w)) for w in group)
    entry = _PACKED.get(group[0])
    if entry is None or entry[0] != stamp:
        entry = (stamp, pack(weights))
        _PACKED[group[0]] = entry
    return entry[1]


def _version(t: torch.Tensor) -> int:
    # Tensors made under inference_mode keep no version counter: packed once, never refreshed.
    return -1 if t.is_inference() else t._version
