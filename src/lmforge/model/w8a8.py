"""W8A8Linear: int8 weights *and* int8 activations, multiplied as integers (SmoothQuant's layer).

    y = s_x * s_w * (q_x @ q_w^T)      q_w int8 [out, in], s_w one float32 scale per output row
    q_x = round(x' / s_x), x' = x * input_scale,  s_x = max|x'| / 127 per row (token), dynamic

`input_scale` is SmoothQuant's 1/s: the weights were multiplied by s before rounding, the
activations are divided by it here, which moves outlier channels' range from the activations
(quantised per token, where one outlier ruins every other channel's resolution) into the weights
(quantised per output row, where it is spread over many rows). lmforge.quant.smoothquant picks s.

Weight-only int8/int4 kernels dequantise to floating point and multiply: at one row they save
memory traffic, at 16 rows and more they cost what a float GEMM does. Here the product is an int8
dot product with int32 accumulation (oneDNN: AMX or VNNI on x86), several times faster than float
on a batch, and exact: each row's integer result does not depend on which other rows share the call.
(The engine's decode rows attend with the same bits alone and batched on CPU, serve/row_attention.cpp;
prefill's float parts still round according to the step's size, and rounding activations to int8 can
turn such a difference into a different token. See the README.)

CPU with VNNI or AMX: oneDNN's `qlinear_pointwise` on a weight pre-packed on first use (kept outside
the module: it is a CPU-specific layout, not saved, repacked when the weight tensor changes). The call
is wrapped in a custom op so that torch.compile treats it as one opaque kernel. Other devices, a
PyTorch without oneDNN, or a CPU where oneDNN's int8 GEMM is not exact (AVX2 without VNNI adds pairs
of u8 x s8 products in saturating int16: seen on an AMD EPYC, every large product wrong): the same
integer product computed in float32 (exact while the dot products stay below 2^24, far above what
per-row scaling produces in practice).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.prepack import prepacked

ONEDNN_INT8_OP = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
# oneDNN computes products of at most this many outputs (rows x out_features) with a reference
# kernel ~1000x slower than its int8 GEMM (one decode row through a 192-wide k_proj: 2.7 ms instead
# of 40 us); such calls get zero rows appended, which cost nothing and change no other row.
ONEDNN_SLOW_OUTPUTS = 256


def _onednn_int8_is_exact() -> bool:
    """Whether oneDNN's int8 GEMM returns the exact product on this CPU: one call whose pairs of products
    overflow int16 (127 x 127 everywhere) tells, 512 outputs so that it takes the GEMM, not the
    reference kernel."""
    if not ONEDNN_INT8_OP:
        return False
    x, w = torch.full((16, 64), 127, dtype=torch.int8), torch.full((32, 64), 127, dtype=torch.int8)
    packed, zeros = _pack(w)
    y = torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, torch.ones(32), zeros, None, 1.0, 0, torch.float32,
                                           "none", [], "")
    return bool((y == 127 * 127 * 64).all())


def _pack(qweight: torch.Tensor):
    """-> (oneDNN's packed int8 weight, the int32 zero points it takes: all 0, symmetric)."""
    return torch.ops.onednn.qlinear_prepack(qweight, None), torch.zeros(qweight.shape[0], dtype=torch.int32)


_ONEDNN = _onednn_int8_is_exact()


@torch.library.custom_op("lmforge::int8_mm", mutates_args=())
def int8_mm(xq: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(xq [rows, in] int8 @ qweight [out, in] int8^T) * scale [out] -> float32 [rows, out]."""
    rows, n_out = xq.shape[0], qweight.shape[0]
    if xq.device.type == "cpu" and _ONEDNN and rows:
        packed, zeros = prepacked(qweight, _pack)
        if rows * n_out <= ONEDNN_SLOW_OUTPUTS:
            xq = F.pad(xq, (0, 0, 0, ONEDNN_SLOW_OUTPUTS // n_out + 1 - rows))
        y = torch.ops.onednn.qlinear_pointwise(xq.contiguous(), 1.0, 0, packed, scale.float(), zeros, None,
                                               1.0, 0, torch.float32, "none", [], "")
        return y[:rows]
    return (xq.float() @ qweight.float().t()) * scale.float()


@int8_mm.register_fake
def _(xq, qweight, scale):
    return xq.new_empty(xq.shape[0], qweight.shape[0], dtype=torch.float32)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [rows, in] -> (int8 codes, float32 scale [rows, 1]): symmetric, per row."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


class W8A8Linear(nn.Module):
    """int8 weights [out, in] with per-row float32 scales, and the per-input `input_scale` that the
    activations are multiplied by before their per-token int8 quantisation."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("input_scale", input_scale)
        self.bias = None

    @classmethod
    def empty(cls, out_features: int, in_features: int) -> "W8A8Linear":
        return cls(torch.zeros(out_features, in_features, dtype=torch.int8), torch.zeros(out_features),
                   torch.ones(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float() * self.input_scale
        xq, sx = quantize_rows(flat)
        y = int8_mm(xq, self.qweight, self.scale) * sx
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights and activations"
