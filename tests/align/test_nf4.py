"""NF4 with double quantisation (QLoRA): the level table, the round trip, the storage cost, and a
QLoRA model that learns."""
import pytest
import torch
from torch import nn

from lmforge.align.lora import apply_lora, lora_layers, lora_parameters, merge
from lmforge.quant.nf4 import LEVELS, NF4Linear, dequantize_nf4, quantize_nf4, storage_bytes
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer

# The NF4 data type as published (QLoRA paper, appendix E; bitsandbytes' NF4 code table).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def test_levels_match_the_published_nf4_table():
    assert LEVELS.tolist()[7] == 0.0 and LEVELS.tolist()[0] == -1.0 and LEVELS.tolist()[15] == 1.0
    torch.testing.assert_close(LEVELS, torch.tensor(PUBLISHED_NF4), atol=1e-6, rtol=0)


def test_round_trip_picks_the_nearest_level_of_each_block():
    """Each value becomes absmax * (the level nearest to value/absmax); the only other error is
    the 8-bit quantisation of absmax itself."""
    torch.manual_seed(0)
    w = torch.randn(96, 80) * torch.rand(96, 1)  # rows of different scales; 7680 values = 120 blocks
    q = quantize_nf4(w)
    back = dequantize_nf4(q, w.shape)
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    nearest = torch.tensor(PUBLISHED_NF4)[(blocks / absmax)[..., None].sub(torch.tensor(PUBLISHED_NF4)).abs().argmin(-1)]
    ideal = (nearest * absmax).reshape(w.shape)
    absmax_back = back.reshape(-1, 64).abs().amax(1, keepdim=True)
    absmax_error = (absmax_back - absmax).abs()
    spread = absmax.max() - absmax.min()
    assert absmax_error.max() <= spread / 127 + 1e-6  # 8-bit steps over the centred range
    assert ((back - ideal).abs().reshape(-1, 64) <= absmax_error + 1e-6).all()
    # and the total error is bounded by half the widest gap between levels, times the block's absmax
    half_gap = (torch.tensor(PUBLISHED_NF4).diff().max() / 2).item()
    assert ((back - w).abs().reshape(-1, 64) <= half_gap * absmax + absmax_error + 1e-6).all()
    rel = (back - w).norm() / w.norm()
    assert rel < 0.12, rel


def test_sizes_that_do_not_fill_a_block_round_trip():
    torch.manual_seed(1)
    w = torch.randn(7, 13)
    back = dequantize_nf4(quantize_nf4(w), w.shape)
    assert back.shape == w.shape
    assert ((back - w).abs() <= 0.16 * w.abs().max() + 1e-3).all()
    zero = torch.zeros(3, 64)
    assert torch.equal(dequantize_nf4(quantize_nf4(zero), zero.shape), zero)


def test_double_quantisation_stores_4_127_bits_per_parameter():
    """QLoRA: 4 bits + 8/64 for the 8-bit absmax + 32/(64*256) for the second-level scales."""
    w = torch.randn(1024, 4096)
    bits = 8 * storage_bytes(quantize_nf4(w)) / w.numel()
    assert abs(bits - 4.127) < 1e-3, bits
    assert bits < 4 + 32 / 64  # what single quantisation with fp32 absmax would cost


def test_nf4_linear_matches_a_linear_with_the_dequantised_weight_and_passes_gradients():
    torch.manual_seed(2)
    lin = nn.Linear(64, 48, bias=True)
    q = NF4Linear(lin)
    x = torch.randn(5, 64, requires_grad=True)
    out = q(x)
    torch.testing.assert_close(out, x @ q.dequantized_weight().T + lin.bias, atol=1e-6, rtol=0)
    assert (q.dequantized_weight() - lin.weight).abs().max() < 0.16 * lin.weight.abs().max()
    out.sum().backward()
    assert x.grad is not None and not [p for p in q.parameters() if p.requires_grad]


def qlora_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=32)
    return Transformer(cfg)


def test_a_qlora_model_trains_and_its_base_stays_frozen():
    model = apply_lora(qlora_model(), r=8, alpha=16, quantize_base="nf4")
    layers = lora_layers(model)
    assert layers and all(isinstance(layer.base_layer, NF4Linear) for layer in layers.values())
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    with pytest.raises(LmforgeError, match="NF4"):
        merge(model)


def test_fresh_qlora_adapters_equal_the_quantised_base_exactly():
    model = qlora_model()
    plain = qlora_model()
    apply_lora(model, quantize_base="nf4")
    for name, layer in lora_layers(model).items():  # the base a QLoRA model starts from
        with torch.no_grad():
            plain.get_submodule(name).weight.copy_(layer.base_layer.dequantized_weight())
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_nf4_linear_on_cuda_is_close_to_the_dequantised_product():
    torch.manual_seed(3)
    lin = nn.Linear(256, 128, bias=False).cuda().half()
    q = NF4Linear(lin)
    x = torch.randn(4, 256, device="cuda", dtype=torch.half)
    ref = x.float() @ q.dequantized_weight(torch.float32).T
    torch.testing.assert_close(q(x).float(), ref, atol=2e-2, rtol=2e-2)
    assert (q.dequantized_weight(torch.float32) - lin.weight.float()).abs().max() < 0.16 * lin.weight.abs().max()


def test_a_qlora_adapter_saves_and_loads_onto_a_freshly_quantised_base(tmp_path):
    from lmforge.align.lora import load_adapter, save_adapter
    model = apply_lora(qlora_model(), r=4, alpha=8, quantize_base="nf4")
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)
    out = save_adapter(model, tmp_path / "adapter")
    again = load_adapter(qlora_model(), out, quantize_base="nf4")
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model.eval()(x))
