"""PackedLinear (float32 CPU inference through oneDNN on a prepacked weight) against the float64
product and F.linear: the same numbers to float32 rounding, the packed kernel really taking over
from MIN_PACKED_ROWS rows, sibling layers (q/k/v) sharing one packed copy, the packed copy following
in-place updates of any of its weights, and the swap leaving the model's parameters, ties, state dict
and gradients as they were."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import packed_linear as pl
from lmforge.model.packed_linear import MAX_PACKED_ROWS, MIN_PACKED_ROWS, PackedLinear, pack_linears
from lmforge.model.quantized import project
from lmforge.model.prepack import _PACKED
from lmforge.serve import EngineConfig, LLMEngine
from tests.serve.helpers import tiny_model

VOCAB = 9000   # tiny_model's 9000 x 64 LM head is over MIN_PACKED_WEIGHT; its 64-wide layers are not


def layer(n_in=576, n_out=1000, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = PackedLinear(n_in, n_out, bias=bias)
    return lin.requires_grad_(False)


@pytest.fixture(autouse=True)
def onednn():
    if not pl._ONEDNN:
        pytest.fail("this PyTorch has no oneDNN linear: the packed kernel is untested")


@pytest.mark.parametrize("bias", [False, True])
def test_equals_the_float64_product_at_every_row_count(bias):
    lin = layer(bias=bias)
    w64 = lin.weight.double()
    b64 = lin.bias.double() if bias else None
    for rows in (1, 2, 3, 4, 5, 16, 64, 257):
        x = torch.randn(2, rows, 576)
        with torch.inference_mode():
            y = lin(x)
        ref = F.linear(x.double(), w64, b64)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=2e-5)
        assert y.shape == (2, rows, 1000)


def test_the_packed_kernel_takes_over_from_min_to_max_rows():
    lin = layer()
    with torch.inference_mode():
        lin(torch.randn(MIN_PACKED_ROWS - 1, 576))
        lin(torch.randn(MAX_PACKED_ROWS + 1, 576))
        assert lin.weight not in _PACKED, "row counts outside MIN..MAX_PACKED_ROWS should stay on F.linear"
        lin(torch.randn(MIN_PACKED_ROWS, 576))
    assert lin.weight in _PACKED, "MIN_PACKED_ROWS rows did not use the prepacked weight"


def test_the_packed_copy_follows_an_in_place_update():
    lin, other = layer(seed=0), layer(seed=1)
    x = torch.randn(8, 576)
    with torch.inference_mode():
        before = lin(x)
    lin.load_state_dict(other.state_dict())   # copies in place: same tensor, new _version
    with torch.inference_mode():
        after = lin(x)
        expected = other(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_a_weight_made_under_inference_mode_packs():   # no version counter to read
    with torch.inference_mode():
        lin = layer()
        x = torch.randn(8, 576)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=1e-5, atol=2e-5)
    assert lin.weight in _PACKED


def qkv():   # SmolLM2's shapes: each under MIN_PACKED_WEIGHT alone, over it together
    return layer(n_out=576, seed=0), layer(n_out=192, seed=1), layer(n_out=192, seed=2)


@pytest.mark.parametrize("rows", [1, 3, MIN_PACKED_ROWS, 16, MAX_PACKED_ROWS, MAX_PACKED_ROWS + 1])
def test_siblings_projected_together_equal_each_alone(rows):
    layers = qkv()
    x = torch.randn(rows, 576)
    with torch.inference_mode():
        outs = project(x, *layers)
    for out, lin in zip(outs, layers):
        torch.testing.assert_close(out.double(), F.linear(x.double(), lin.weight.double()), rtol=1e-5, atol=2e-5)
    # alone, each is too small to pack; together they share one packed copy, kept under q's weight
    assert [w for w in _PACKED.keys() if any(w is lin.weight for lin in layers)] == (
        [layers[0].weight] if pl.packs(rows) else [])


def test_the_shared_packed_copy_follows_an_update_of_any_sibling():
    layers = qkv()
    x = torch.randn(8, 576)
    with torch.inference_mode():
        project(x, *layers)
    layers[2].load_state_dict(layer(n_out=192, seed=3).state_dict())   # v only, in place
    with torch.inference_mode():
        v = project(x, *layers)[2]
    torch.testing.assert_close(v, F.linear(x, layers[2].weight), rtol=1e-5, atol=2e-5)


def test_pack_linears_keeps_parameters_ties_state_dict_and_gradients():
    model = tiny_model(VOCAB)
    plain = copy.deepcopy(model)
    state = {k: v for k, v in model.state_dict().items()}
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert pack_linears(model) == linears
    assert isinstance(model.lm_head, PackedLinear)
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied
    after = model.state_dict()
    assert after.keys() == state.keys() and all(after[k].data_ptr() == state[k].data_ptr() for k in state)
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens), plain(tokens), rtol=1e-5, atol=2e-5)
    # training goes through F.linear with autograd, exactly as before the swap
    model(tokens).logsumexp(-1).mean().backward()
    plain(tokens).logsumexp(-1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_hooks_on_packed_siblings_still_fire():
    # calibration (smoothquant, AWQ, GPTQ) hooks each linear; a model an engine has packed must not
    # route around them
    model = tiny_model(VOCAB)
    pack_linears(model)
    seen = []
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj", "up_proj")):
            module.register_forward_pre_hook(lambda m, args, name=name: seen.append(name))
    with torch.inference_mode():
        model(torch.randint(0, VOCAB, (2, 8)))
    assert sorted(seen) == sorted(n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj", "up_proj")))


def test_the_engine_packs_float32_cpu_models_only():
    def packed(model, **kw):
        LLMEngine(model, None, EngineConfig(num_blocks=8, **kw))
        return sum(isinstance(m, PackedLinear) for m in model.modules())
    linears = sum(type(m) is torch.nn.Linear for m in tiny_model(VOCAB).modules())
    assert packed(tiny_model(VOCAB)) == linears
    assert packed(tiny_model(VOCAB), prepack_weights=False) == 0
    assert packed(tiny_model(VOCAB).double()) == 0
