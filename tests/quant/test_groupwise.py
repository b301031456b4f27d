"""Group-wise int4 (r = S (q - Z)): the round trip against the formula, the packed layout, and both
CPU int4 kernels (PyTorch's, lmforge's int4 x int8) against reference matmuls."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model import int4_cpu
from lmforge.model.quantized import Int4Linear, project, unpack_nibbles
from lmforge.quant.groupwise import dequantize, group_params, quantize_with, rtn, rtn_linear


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("asym", [False, True])
def test_codes_on_the_grid_round_trip_exactly(group_size, asym):
    """Weights built as S (q - Z) from known codes come back as exactly those codes."""
    torch.manual_seed(0)
    out, n = 24, 4 * group_size
    g = n // group_size
    scale = torch.rand(out, g) + 0.1
    if asym:
        zero = torch.randint(0, 16, (out, g)).float()
        codes = torch.randint(0, 16, (out, n))
        codes[:, ::group_size], codes[:, 1::group_size] = 0, 15   # each group spans the full range
    else:
        zero = torch.full((out, g), 8.0)
        codes = torch.randint(1, 16, (out, n))
        codes[:, ::group_size] = 15                                # max |q - 8| = 7 in each group
    w = scale.repeat_interleave(group_size, 1) * (codes - zero.repeat_interleave(group_size, 1))
    q, s, z = rtn(w, 4, group_size, asym)
    assert torch.equal(q.long(), codes)
    torch.testing.assert_close(dequantize(q, s, z, group_size), w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("asym", [False, True])
def test_rounding_error_is_at_most_half_a_step_and_codes_are_in_range(asym):
    torch.manual_seed(1)
    w = torch.randn(32, 200) * torch.logspace(-2, 1, 32)[:, None]   # 200: a short last group of 72
    q, s, z = rtn(w, 4, 128, asym)
    assert q.min() >= 0 and q.max() <= 15
    assert torch.equal(z, z.round())            # integer zero points
    if not asym:
        assert (z == 8).all()
    step = s.repeat_interleave(128, 1)[:, :200]
    assert ((dequantize(q, s, z, 128) - w).abs() <= step / 2 + 1e-6).all()


def test_int4_linear_stores_the_codes_and_reconstructs_r_equals_s_q_minus_z():
    torch.manual_seed(2)
    w = torch.randn(48, 96)
    q, s, z = rtn(w, 4, 32, asym=True)
    layer = Int4Linear.from_codes(q, s, z, 32)
    assert layer.packed.dtype == torch.uint8 and layer.packed.shape == (48, 48)
    assert torch.equal(layer.codes(), q.to(torch.uint8))
    ref = s.repeat_interleave(32, 1) * (q.float() - z.repeat_interleave(32, 1))
    torch.testing.assert_close(layer.dequantized(), ref, rtol=0, atol=0)


CPU_FLAGS = {"avx512-vnni": "avx512_vnni", "avx2": "avx2"}   # lmforge's kernel paths -> /proc/cpuinfo flag


def _cpu_flags() -> set[str]:
    try:
        return set(open("/proc/cpuinfo").read().split())
    except OSError:
        return set()


def _use_kernel(name: str, monkeypatch) -> None:
    """Int4Linear layers built from here on use this kernel: "torch" or one of lmforge's (int4_cpu.ISAS),
    which must build and run on every CPU with the flag (a CPU without it skips, on the allowlist)."""
    if name == "torch":
        monkeypatch.setattr(int4_cpu, "isa", lambda: 0)
        return
    if CPU_FLAGS[name] not in _cpu_flags():
        pytest.skip(f"CPU without {name.upper()}: lmforge's {name} int4 kernel does not run here")
    assert int4_cpu.isa() >= int4_cpu.ISAS[name], f"lmforge's int4 kernel did not build on a CPU with {name}"
    monkeypatch.setattr(int4_cpu, "isa", lambda: int4_cpu.ISAS[name])


@pytest.fixture(params=["torch", *int4_cpu.ISAS])
def kernel(request, monkeypatch):
    _use_kernel(request.param, monkeypatch)
    return request.param


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("group_size,n_in", [(32, 96), (64, 576), (128, 576)])
@pytest.mark.parametrize("asym", [False, True])
def test_pytorch_int4_kernel_equals_the_dequantised_reference_matmul(group_size, n_in, asym, device, monkeypatch):
    """576 is not a multiple of 128: the kernel path pads the input to whole groups. On CUDA the kernel is
    tinygemm, with its own code layout (96 columns: K tiles of 2 x 16; 576: 4 x 16)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _use_kernel("torch", monkeypatch)
    torch.manual_seed(3)
    layer = rtn_linear(nn.Linear(n_in, 64, bias=False), 4, group_size, asym)
    x = torch.randn(3, n_in)
    # reference in float64 with the same bfloat16 rounding of activations and scales the kernel uses
    s = layer.scales.to(torch.bfloat16).double()
    zero = (layer.scales * (8 - layer.zeros)).to(torch.bfloat16).double()
    q = layer.codes().double()
    w = (s.repeat_interleave(group_size, 1)[:, :n_in] * (q - 8) + zero.repeat_interleave(group_size, 1)[:, :n_in])
    ref = x.to(torch.bfloat16).double() @ w.t()
    exact = x.double() @ layer.dequantized().double().t()
    layer, x = layer.to(device), x.to(device)
    assert layer.uses_kernel(x)
    got = layer(x)
    assert layer._kernel_cache[0] == "torch"
    assert got.shape == (3, 64) and got.dtype == torch.float32
    got = got.cpu().double()
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()   # bfloat16 output: ~3 digits
    assert (got - exact).abs().max() <= 3e-2 * exact.abs().max()
    other = rtn_linear(nn.Linear(n_in, 32, bias=False), 4, group_size, asym).to(device)
    for fused, alone in zip(project(x, layer, other), [layer(x), other(x)]):   # one kernel call, stacked rows
        torch.testing.assert_close(fused, alone, rtol=1e-2, atol=1e-2 * alone.abs().max().item())


def _int8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations as lmforge's kernel quantises them: per 32 inputs, d = max|x| / 127, xq = round(x / d)."""
    blocks = x.view(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return torch.round(blocks * inv), d


@pytest.mark.parametrize("isa", list(int4_cpu.ISAS))
@pytest.mark.parametrize("group_size,n_in", [(32, 96), (64, 576), (128, 576)])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_lmforge_int4_kernel_equals_int8_activation_reference(isa, group_size, n_in, asym, rows, monkeypatch):
    """lmforge's kernel is exact given its one approximation (int8 activations per 32 inputs) and fp16
    scales: compare with that arithmetic in float64. 9 rows = two 4-row passes and a remainder."""
    _use_kernel(isa, monkeypatch)
    torch.manual_seed(rows)
    layer = rtn_linear(nn.Linear(n_in, 48, bias=False), 4, group_size, asym)
    x = torch.randn(rows, n_in)
    x[:, 5] *= 40   # an outlier channel, as residual streams have: only its own block loses precision
    got = layer(x)
    assert layer._kernel_cache == ("lmforge", layer._kernel_cache[1], asym, int4_cpu.ISAS[isa])
    padded = layer.n_groups * group_size
    xq, d = _int8_blocks(F.pad(x, (0, padded - n_in)))
    per_block = group_size // 32
    s = layer.scales.repeat_interleave(per_block, 1).half().double()
    q = unpack_nibbles(layer.packed).double().view(48, -1, 32)
    if asym:
        m = (-layer.scales * layer.zeros).repeat_interleave(per_block, 1).half().double()
        w = s[..., None] * q + m[..., None]
    else:
        w = s[..., None] * (q - 8)
    ref = torch.einsum("rbi,obi->ro", xq.double() * d.double(), w)
    assert got.shape == (rows, 48) and got.dtype == torch.float32
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    exact = x.double() @ layer.dequantized().double().t()
    assert (got.double() - exact).abs().max() <= 3e-2 * exact.abs().max()


@pytest.mark.parametrize("isa", list(int4_cpu.ISAS))
@pytest.mark.parametrize("rows", [1, 4])
def test_lmforge_int4_kernel_extreme_codes_and_activations_sum_exactly(isa, rows, monkeypatch):
    """The largest block sums the kernel meets: every code 15 (or 0) against activations that all quantise
    to +-127. The AVX2 path sums a block's products in int16 lanes (16 products of <= 15 * 127 each), so
    this is the case that would saturate if a lane held more; all integers here, so the result is exact."""
    _use_kernel(isa, monkeypatch)
    n_in, out = 96, 32
    codes = torch.full((out, n_in), 15)
    codes[out // 2:] = 0                                 # the other extreme: q - 8 = -8
    scales = torch.ones(out, n_in // 32)
    packed, asym = int4_cpu.pack(codes, scales, None)
    x = torch.full((rows, n_in), 3.0)
    x[:, 64:] *= -1                                      # two positive blocks, then a negative one
    got = int4_cpu.mm(x, packed, out, asym, int4_cpu.isa())
    ref = (x / 3 * 127).double() @ (codes.double() - 8).t() * (3 / 127)   # d = 3 / 127, xq = +-127
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("asym", [False, True])
def test_lmforge_int4_kernel_paths_agree_bit_for_bit(asym, monkeypatch):
    """The AVX2 path (VPMADDUBSW + VPMADDWD) and the AVX512-VNNI path (VPDPBUSD) sum the same integers
    in the same float order: identical outputs."""
    torch.manual_seed(7)
    layer = rtn_linear(nn.Linear(576, 96, bias=False), 4, 32, asym)
    x = torch.randn(6, 576)
    outputs = []
    for isa in int4_cpu.ISAS:
        _use_kernel(isa, monkeypatch)
        layer._invalidate()
        outputs.append(layer(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("isa", list(int4_cpu.ISAS))
def test_lmforge_int4_kernel_rows_do_not_depend_on_the_batch(isa, monkeypatch):
    """Each row is quantised and summed on its own, in the same order whatever the other rows: a
    sequence decodes to the same bits alone, in a batch, or as one of k+1 speculative rows."""
    _use_kernel(isa, monkeypatch)
    torch.manual_seed(8)
    layer = rtn_linear(nn.Linear(576, 64, bias=False), 4, 32, True)
    x = torch.randn(9, 576)
    together = layer(x)
    for i in range(9):
        torch.testing.assert_close(layer(x[i:i + 1]), together[i:i + 1], rtol=0, atol=0)


def test_lmforge_int4_kernel_threads_split_tiles_without_changing_a_bit(monkeypatch):
    _use_kernel("avx512-vnni", monkeypatch)
    torch.manual_seed(9)
    layer = rtn_linear(nn.Linear(576, 1024, bias=False), 4, 32, False)   # 64 tiles: several per thread
    x = torch.randn(5, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = layer(x)
        torch.set_num_threads(4)
        torch.testing.assert_close(layer(x), alone, rtol=0, atol=0)
        torch.testing.assert_close(alone, x @ layer.dequantized().t(), rtol=3e-2, atol=3e-2 * alone.abs().max().item())
    finally:
        torch.set_num_threads(threads)


def test_scales_beyond_fp16_take_the_pytorch_kernel():
    """lmforge's layout stores fp16 scales: a weight whose scales overflow fp16 keeps PyTorch's kernel."""
    torch.manual_seed(6)
    layer = rtn_linear(nn.Linear(64, 32, bias=False), 4, 32, False)
    layer.scales.mul_(1e8)   # scales of ~1e6: beyond fp16's 65504
    x = torch.randn(2, 64)
    got = layer(x)
    assert layer._kernel_cache[0] == "torch"
    exact = x.double() @ layer.dequantized().double().t()
    assert (got.double() - exact).abs().max() <= 3e-2 * exact.abs().max()


def test_int4_kernel_choice_follows_the_environment():
    """LMFORGE_INT4_KERNEL=torch keeps PyTorch's kernel (for comparisons), avx2 forces the AVX2 path, auto
    takes the best the CPU has, anything else is an error that names the choices."""
    code = "from lmforge.model import int4_cpu; print(int4_cpu.isa(), int4_cpu.describe())"
    cpu = _cpu_flags()
    best = 2 if "avx512_vnni" in cpu else 1 if "avx2" in cpu else 0
    names = {0: "PyTorch's int4 kernel", 1: "lmforge's int4 x int8 kernel (avx2)",
             2: "lmforge's int4 x int8 kernel (avx512-vnni)"}
    for choice, want in (("torch", 0), ("avx2", min(best, 1)), ("auto", best)):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LMFORGE_INT4_KERNEL": choice},
                             capture_output=True, text=True, check=True)
        assert out.stdout.startswith(f"{want} {names[want]}"), (choice, out.stdout)
    bad = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LMFORGE_INT4_KERNEL": "fast"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "must be one of auto, avx2, torch" in bad.stderr


def test_serve_names_the_int4_kernel_only_for_int4_models(capsys):
    from lmforge.serve.cli import _say_int4_kernel
    _say_int4_kernel(nn.Sequential(nn.Linear(64, 32)))
    assert capsys.readouterr().out == ""
    _say_int4_kernel(nn.Sequential(rtn_linear(nn.Linear(64, 32, bias=False), 4, 32, False)))
    assert capsys.readouterr().out.startswith(f"int4 layers on CPU: {int4_cpu.describe()}")


def test_fused_projection_equals_the_separate_layers_and_follows_reloads(kernel):
    """q/k/v (and gate/up) share one kernel call over stacked rows: same outputs as one call per layer,
    and reloading one layer's weights (or moving it) rebuilds the fused kernel."""
    torch.manual_seed(5)
    layers = [rtn_linear(nn.Linear(96, n, bias=False), 4, 32, True) for n in (64, 32, 32)]
    x = torch.randn(1, 3, 96)
    for got, want in zip(project(x, *layers), [layer(x) for layer in layers]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert layers[0]._fused[1][0] == ("torch" if kernel == "torch" else "lmforge")
    other = rtn_linear(nn.Linear(96, 32, bias=False), 4, 32, True)
    layers[2].load_state_dict(other.state_dict())
    torch.testing.assert_close(project(x, *layers)[2], other(x), rtol=0, atol=0)
    layers[1].float()   # .to()/.float() also invalidate
    torch.testing.assert_close(project(x, *layers)[1], layers[1](x), rtol=0, atol=0)
    # mixed layer types, or too many rows for the kernel, fall back to one call per layer
    plain = nn.Linear(96, 32, bias=False)
    torch.testing.assert_close(project(x, layers[0], plain)[1], plain(x), rtol=0, atol=0)
    big = torch.randn(300, 96)
    torch.testing.assert_close(project(big, *layers)[0], big @ layers[0].dequantized().t())


def test_large_inputs_take_the_dequantised_float_path():
    torch.manual_seed(4)
    layer = rtn_linear(nn.Linear(64, 32, bias=False), 4, 32, False)
    x = torch.randn(2, 150, 64)    # 300 rows: a scoring pass, not a decode step or a prompt chunk
    assert not layer.uses_kernel(x)
    assert layer.uses_kernel(x[:, :100])     # 200 rows: a serving prompt chunk takes the kernel
    torch.testing.assert_close(layer(x), x @ layer.dequantized().t())


def test_group_params_clip_shrinks_the_range():
    w = torch.linspace(-1, 1, 64)[None]
    s_full, _ = group_params(w, 4, 64, asym=False)
    s_half, _ = group_params(w, 4, 64, asym=False, clip=0.5)
    torch.testing.assert_close(s_half, s_full / 2)
    q = quantize_with(w, s_half, torch.full_like(s_half, 8), 4, 64)
    assert q.max() == 15 and q.min() == 0          # out-of-range values clamp to the end codes
