"""Quantised linear layers: how a quantised weight is stored and multiplied (not how it is chosen:
that is lmforge.quant). They live with the model so that `lmforge.model.load` can rebuild a
quantised checkpoint without importing the quantisers.

Two weight-only storage formats, both bias-free drop-ins for nn.Linear (a third, W8A8Linear, int8
weights and activations, is lmforge.model.w8a8):
- Int8Linear: w ~= q * s, q int8 [out, in], one float32 scale per output row.
  CPU: PyTorch's int8-weight kernel `_weight_int8pack_mm` (bfloat16 activations, the per-row
  scale applied in float32 afterwards); elsewhere (x @ q^T) * s.
- Int4Linear: 4-bit codes q in 0..15, groups of `group_size` inputs, one scale S and one zero
  point Z per (row, group). Uniform grid: r = S (q - Z). Codebook grid (NF4): r = S codebook[q].
  CPU, uniform grid: lmforge's int4 x int8 kernel (int4_cpu: int8 activations per 32 inputs, VNNI
  dot products) where the CPU has AVX512-VNNI, else PyTorch's `_weight_int4pack_mm_for_cpu`, which
  computes (q - 8) * scale + zero, so it is fed zero = S (8 - Z) (bfloat16 scales, activations,
  output). Either kernel's layout is built on first use and not saved (it is CPU-specific); the
  checkpoint holds two codes per byte, low nibble first. `in` is padded up to a whole number of
  groups (the padding codes meet zero activations). The kernel serves decode steps and prompt
  chunks up to INT4_KERNEL_MAX_ROWS rows; longer inputs use the dequantised float weight.
  CUDA (compute capability 8.0 and up), uniform grid: PyTorch's `_weight_int4pack_mm` (the
  tinygemm kernel: the same zero = S (8 - Z) and bfloat16 scales, its own tiled layout of the codes).

`project(x, *layers)` applies several layers that read the same input (q/k/v, gate/up): Int4Linear
layers on the kernel path share one kernel call over their concatenated rows (built on first use,
rebuilt when any of them is reloaded or moved), which saves the per-call overhead that dominates
a 135M model's decode step on one CPU thread; float32 PackedLinear layers likewise share one
oneDNN call (packed_linear.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import int4_cpu
from lmforge.model.packed_linear import fusable, packed_project
from lmforge.model.w8a8 import W8A8Linear

_CPU_INT8_MM = hasattr(torch, "_weight_int8pack_mm")
_CPU_INT4_MM = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
_CUDA_INT4_MM = hasattr(torch.ops.aten, "_weight_int4pack_mm")
INT4_KERNEL_GROUPS = (32, 64, 128, 256)   # group sizes PyTorch's int4 kernels accept
# The packed kernels win when decoding (a few rows: memory-bound); a long scoring pass is
# compute-bound, where dequantising once and calling the float matmul can be faster.
KERNEL_MAX_ROWS = 32
# Unpacking int4 codes to a float weight costs more than the int4 kernel's own matmul up to at least
# 512 rows (SmolLM2 shapes, 2 threads: ~2.5-3x), so chat-sized prompt chunks take the kernel too
# (bfloat16 activations, as when decoding); scoring windows (512 tokens and up) keep float32.
INT4_KERNEL_MAX_ROWS = 256


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


class Int8Linear(nn.Module):
    """Holds int8 weights [out, in] and per-row float32 scales."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        # The kernel's own scales, all ones: the real ones are applied in float32 afterwards. A buffer,
        # not a fresh tensor per call, because torch.compile's lowering of the kernel needs a stored one.
        self.register_buffer("unit_scale", torch.ones(self.out_features, dtype=torch.bfloat16), persistent=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def _apply(self, fn, recurse=True):  # model.to(dtype) must not change the kernel's bfloat16 ones
        super()._apply(fn, recurse)
        self.unit_scale = self.unit_scale.to(torch.bfloat16)
        return self

    @classmethod
    def empty(cls, out_features: int, in_features: int) -> "Int8Linear":
        return cls(torch.zeros(out_features, in_features, dtype=torch.int8), torch.zeros(out_features))

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and _CPU_INT8_MM and _rows(x) <= KERNEL_MAX_ROWS:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.qweight, self.unit_scale).float() * self.scale
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """codes 0..15 [out, in] (in even) -> uint8 [out, in/2], low nibble = even column."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(packed.shape[0], -1)


class Int4Linear(nn.Module):
    """4-bit group-wise weights: packed codes, scales and zero points per (row, group), and an
    optional 16-entry codebook (then r = S codebook[q] and the zero points are unused)."""

    def __init__(self, out_features: int, in_features: int, group_size: int, codebook: bool = False):
        super().__init__()
        if group_size < 2 or group_size % 2:
            raise LmforgeError(f"int4 group size must be an even number >= 2, got {group_size}")
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        self.n_groups = -(-in_features // group_size)
        padded = self.n_groups * group_size
        self.register_buffer("packed", torch.zeros(out_features, padded // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, self.n_groups))
        self.register_buffer("zeros", torch.zeros(out_features, self.n_groups))
        self.register_buffer("codebook", torch.zeros(16) if codebook else None)
        self.bias = None
        self._kernel_cache = None   # the CPU kernel's layout of this layer (_int4_kernel_layout)
        self._generation = 0        # bumped whenever the weights may have changed (fused kernels check it)
        self._fused = None          # (key, layout, widths): this layer + siblings in one kernel

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                   codebook: torch.Tensor | None = None) -> "Int4Linear":
        """q int codes [out, in]; scales/zeros [out, n_groups]."""
        out_features, in_features = q.shape
        layer = cls(out_features, in_features, group_size, codebook is not None)
        padded = F.pad(q.to(torch.uint8), (0, layer.n_groups * group_size - in_features))
        layer.packed.copy_(pack_nibbles(padded))
        layer.scales.copy_(scales)
        if zeros is not None:
            layer.zeros.copy_(zeros)
        if codebook is not None:
            layer.codebook.copy_(codebook)
        return layer

    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.packed)[:, :self.in_features]

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [out, in] these codes stand for (the reference for every path)."""
        q = unpack_nibbles(self.packed).float().view(self.out_features, self.n_groups, self.group_size)
        s, z = self.scales.float()[..., None], self.zeros.float()[..., None]
        w = s * self.codebook.float()[q.long()] if self.codebook is not None else s * (q - z)
        return w.view(self.out_features, -1)[:, :self.in_features]

    def uses_kernel(self, x: torch.Tensor) -> bool:
        if self.codebook is not None or self.group_size not in INT4_KERNEL_GROUPS or _rows(x) > INT4_KERNEL_MAX_ROWS:
            return False
        if x.device.type == "cpu":
            return _CPU_INT4_MM and self.out_features % 16 == 0
        return x.device.type == "cuda" and _CUDA_INT4_MM and self.out_features % 8 == 0 and _tinygemm_runs(x.device)

    def _kernel_weights(self):
        if self._kernel_cache is None:
            self._kernel_cache = _int4_kernel_layout([self])
        return self._kernel_cache

    def _invalidate(self) -> None:
        self._kernel_cache = self._fused = None
        self._generation += 1

    def _apply(self, fn, recurse=True):  # .to()/.cuda() invalidate the kernel layout
        self._invalidate()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._invalidate()
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_kernel(x):
            return _int4_kernel_mm(x, self._kernel_weights(), self.group_size,
                                   self.n_groups * self.group_size - self.in_features, self.out_features)
        return F.linear(x, self.dequantized().to(x.dtype))

    def fused_forward(self, layers: tuple["Int4Linear", ...], x: torch.Tensor) -> list[torch.Tensor]:
        """`[layer(x) for layer in layers]` (self first) with one kernel call over their stacked rows."""
        key = tuple((id(layer), layer._generation) for layer in layers)
        if self._fused is None or self._fused[0] != key:
            self._fused = (key, _int4_kernel_layout(layers), [layer.out_features for layer in layers])
        _, layout, widths = self._fused
        y = _int4_kernel_mm(x, layout, self.group_size, self.n_groups * self.group_size - self.in_features, sum(widths))
        return list(y.split(widths, dim=-1))

    def extra_repr(self) -> str:
        grid = "codebook" if self.codebook is not None else "uniform"
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{self.group_size} {grid}"


_TINYGEMM_RUNS: dict[int | None, bool] = {}


def _tinygemm_runs(device: torch.device) -> bool:
    """PyTorch's CUDA int4 kernel is built for compute capability 8.0 (Ampere) and up (asked once a device)."""
    if device.index not in _TINYGEMM_RUNS:
        _TINYGEMM_RUNS[device.index] = torch.cuda.get_device_capability(device)[0] >= 8
    return _TINYGEMM_RUNS[device.index]


def _int4_kernel_layout(layers) -> tuple:
    """The kernel's weight for the layers' rows stacked in order: ("lmforge", packed, asym, isa) for
    lmforge's int4 x int8 CPU kernel (int4_cpu) where it runs, else ("torch", int4pack weight, bf16
    scales-and-zeros) for PyTorch's (CPU or CUDA, by the layers' device).

    The tensors are marked static for torch.compile: as plain attributes (not buffers) their sizes would
    be symbolic, and duck sizing would tie the trailing 2 of the scales-and-zeros to a batch of 2 rows,
    recompiling when the batch grows."""
    from torch._dynamo import mark_static
    q = torch.cat([unpack_nibbles(layer.packed) for layer in layers])
    scales = torch.cat([layer.scales.float() for layer in layers])
    zeros = torch.cat([layer.zeros.float() for layer in layers])
    if q.device.type == "cuda":   # two codes a byte, the even column in the high nibble; K in tiles of 16
        tiles = next(t for t in (8, 4, 2) if q.shape[1] % (16 * t) == 0)   # padded K: a multiple of 32
        weight = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), tiles)
        layout = ("torch", weight, _torch_scales_and_zeros(scales, zeros))
    else:
        packed = None
        if int4_cpu.isa():
            per_block = layers[0].group_size // int4_cpu.BLOCK
            packed = int4_cpu.pack(q, scales.repeat_interleave(per_block, 1), zeros.repeat_interleave(per_block, 1))
        if packed is not None:   # None: no lmforge kernel here, or a scale beyond fp16's range
            layout = ("lmforge", *packed, int4_cpu.isa())
        else:
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
            layout = ("torch", weight, _torch_scales_and_zeros(scales, zeros))
    for tensor in layout[1:]:
        if isinstance(tensor, torch.Tensor):
            mark_static(tensor)
    return layout


def _torch_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """[n_groups, out, 2] bfloat16 for PyTorch's int4 kernels, which compute (q - 8) scale + zero:
    zero = S (8 - Z) gives S (q - Z)."""
    return torch.stack([scales.t(), (scales * (8 - zeros)).t()], -1).to(torch.bfloat16).contiguous()


def _int4_kernel_mm(x, layout: tuple, group_size: int, padding: int, out_features: int) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if layout[0] == "lmforge":
        flat = F.pad(flat.float(), (0, padding)) if padding else flat.float()
        y = int4_cpu.mm(flat, layout[1], out_features, layout[2], layout[3])
    else:
        flat = flat.to(torch.bfloat16)
        if padding:
            flat = F.pad(flat, (0, padding))
        mm = torch.ops.aten._weight_int4pack_mm if flat.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(flat, layout[1], group_size, layout[2])
    return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])


def project(x: torch.Tensor, *layers: nn.Module) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]`, fused into one int4 kernel call when every layer is an
    Int4Linear on the CPU kernel path with the same input width and groups, into one oneDNN call when
    every layer is a bias-free PackedLinear of the same input width. Layers with forward hooks
    (calibration, interpretability) are called one by one, so that their hooks see the call."""
    if any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers):
        return [layer(x) for layer in layers]
    if fusable(layers):
        return packed_project(x, layers)
    first = layers[0]
    if all(isinstance(layer, Int4Linear) and layer.uses_kernel(x) and layer.group_size == first.group_size
           and layer.in_features == first.in_features for layer in layers):
        return first.fused_forward(layers, x)
    return [layer(x) for layer in layers]


FORMATS = {"int8": Int8Linear, "int4": Int4Linear, "nf4": Int4Linear, "w8a8": W8A8Linear}


def empty_quantized(kind: dict, out_features: int, in_features: int) -> nn.Module:
    """The layer a checkpoint's quantisation entry describes, with zero buffers to load into."""
    fmt = kind.get("format")
    if fmt == "int8":
        return Int8Linear.empty(out_features, in_features)
    if fmt == "w8a8":
        return W8A8Linear.empty(out_features, in_features)
    if fmt in ("int4", "nf4"):
        return Int4Linear(out_features, in_features, int(kind["group_size"]), codebook=fmt == "nf4")
    raise LmforgeError(f"unknown quantised format {fmt!r} (known: {sorted(FORMATS)})")


def swap_in_quantized(model: nn.Module, layers: dict[str, dict]) -> nn.Module:
    """Replace the named nn.Linear modules with empty quantised ones (before loading a state dict)."""
    for name, kind in layers.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise LmforgeError(f"quantisation entry names no module of this model: {name!r}") from None
        if not isinstance(linear, nn.Linear):
            raise LmforgeError(f"quantisation entry {name!r} is not a linear layer")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, empty_quantized(kind, linear.out_features, linear.in_features))
    return model
