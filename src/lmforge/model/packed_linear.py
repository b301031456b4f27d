"""PackedLinear: nn.Linear whose float32 CPU inference runs oneDNN's inner product on a prepacked weight.

A float32 GEMM with a few rows (a decode batch, a speculative verification) is bound by reading the
weight, yet `F.linear`'s BLAS call re-packs the weight into its blocked layout on every call once
there is more than one row (Intel Xeon: from ~4 rows; AMD EPYC: from 2), so a few rows cost 1.7-3.4x
what one row does. oneDNN's inner product on a weight reordered once into its own layout
(`mkldnn._reorder_linear_weight`, valid for any number of rows: what Inductor's weight prepacking
emits for a dynamic batch) reads it as it is. Weights from beyond L2, one thread, SmolLM2
(`python benchmarks/cpu_matmul_kernels.py`): the 49152x576 LM head at 4 / 16 rows 17.2 / 25.2 ms ->
8.8 / 12.9 ms (Xeon), at 2 / 3 rows 17.7 / 27.3 ms -> 7.3 / 8.1 ms (EPYC); 576x1536 (gate, up) at
16 rows 618 -> 532 us (Xeon). oneDNN pays more per call than BLAS, so it loses at one row on all but
the largest weights and on small weights at any row count (under MIN_PACKED_WEIGHT, e.g. 576x576 and
576x192); from ~256 rows (prefill) BLAS is a few % faster again. Those cases keep `F.linear`.

Layers that read the same input (q/k/v, gate/up: `packed_project`) share one call on their weights
stacked into one packed copy: q/k/v, too small to pack alone, pack together (576x960), and one call
replaces two or three. One thread, 16 rows: q/k/v 400 -> 317 us, gate+up 1210 -> 1081 us.

Same float32 arithmetic, a different summation order: results agree with `F.linear` to rounding
(~1e-7 relative), not bit for bit. The packed copy is one more copy of the weights in memory (kept
outside the module, see prepack.py). Used for inference only: with gradients enabled, or off
float32 CPU, it is plain `F.linear`. The serving engine turns a float32 CPU model's linears into
these (`pack_linears`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.prepack import prepacked

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
MIN_PACKED_ROWS = 2           # one row: BLAS's matrix-vector path is as fast or faster
MAX_PACKED_ROWS = 128         # above this (prefill), BLAS is as fast or a few % faster
MIN_PACKED_WEIGHT = 1 << 19   # elements; smaller weights are faster through BLAS at every row count


def packs(rows: int) -> bool:
    return MIN_PACKED_ROWS <= rows <= MAX_PACKED_ROWS


def _reorder(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
    return torch.ops.mkldnn._reorder_linear_weight(stacked.detach(), None)


@torch.library.custom_op("lmforge::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weights: list[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [rows, in] @ cat(weights)^T (+ bias), float32 on CPU: oneDNN on the prepacked stacked weight
    for MIN_PACKED_ROWS..MAX_PACKED_ROWS rows, F.linear otherwise. One opaque op, so a compiled
    graph does not specialise on the row count."""
    if not packs(x.shape[0]):
        if len(weights) == 1:
            return F.linear(x, weights[0], bias)
        return torch.cat([F.linear(x, w) for w in weights], dim=-1)   # bias: with one weight only
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), prepacked(tuple(weights), _reorder), bias,
                                              "none", [None], "")


@packed_linear.register_fake
def _(x, weights, bias):
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))


class PackedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_project(x, (self,))[0]

    def _packable(self, x: torch.Tensor) -> bool:
        return (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)))


def packed_project(x: torch.Tensor, layers: tuple[PackedLinear, ...]) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]` for PackedLinear layers of one input width (with a bias only
    when alone): one oneDNN call on their stacked prepacked weights where that pays."""
    first = layers[0]
    rows = x.numel() // first.in_features
    # One row is a static size in a compiled graph, so this test splits no graph; other row counts
    # are decided here when eager (sparing the custom op's dispatch cost) and by the op when compiled.
    if (not first._packable(x) or rows == 1 or (not torch.compiler.is_compiling() and not packs(rows))
            or sum(layer.weight.numel() for layer in layers) < MIN_PACKED_WEIGHT):
        return [F.linear(x, layer.weight, layer.bias) for layer in layers]
    y = packed_linear(x.reshape(-1, first.in_features), [layer.weight for layer in layers], first.bias)
    y = y.view(*x.shape[:-1], y.shape[-1])
    return [y] if len(layers) == 1 else list(y.split([layer.out_features for layer in layers], dim=-1))


def fusable(layers: tuple[nn.Module, ...]) -> bool:
    """Whether `packed_project` can take these layers together."""
    return (all(type(layer) is PackedLinear and layer.bias is None and layer.in_features == layers[0].in_features
                for layer in layers))


def pack_linears(model: nn.Module) -> int:
    """Replace every plain nn.Linear in `model` by a PackedLinear holding the same parameters (tied
    weights stay tied, the state dict is unchanged); -> how many. A small one alone stays on F.linear
    but packs with its siblings through `packed_project`."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                packed = PackedLinear(child.in_features, child.out_features, bias=False, device="meta")
                packed.weight, packed.bias = child.weight, child.bias
                setattr(parent, name, packed)
                replaced += 1
    return replaced
