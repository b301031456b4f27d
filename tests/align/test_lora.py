"""LoRA on lmforge's Transformer: exact at init, merge/unmerge, frozen base, rsLoRA, the reference
model by switching adapters off, and adapters that peft loads onto transformers' Llama."""
import json
import math

import pytest
import torch

from lmforge.align.lora import (DEFAULT_TARGETS, adapters_disabled, apply_lora, load_adapter,
                                lora_layers, lora_parameters, merge, merge_and_unload, save_adapter, unmerge)
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer, save_hf

CFG = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


def base_model(seed=0, tie=False, dtype=torch.float32):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**CFG, tie_embeddings=tie)).to(dtype).eval()


def lora_model(seed=0, **kw):
    model = base_model(seed)
    apply_lora(model, **{"r": 4, "alpha": 8, **kw})
    return model


def tokens(seed=1, shape=(2, 12)):
    return torch.randint(0, CFG["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps=3, lr=0.05, seed=3):
    """A few AdamW steps on random targets, so every B is non-zero."""
    opt = torch.optim.AdamW(lora_parameters(model), lr=lr)
    model.train()
    for step in range(steps):
        x = tokens(seed + step)
        loss = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_fresh_adapters_leave_every_output_bit_unchanged():
    x = tokens()
    with torch.no_grad():
        ref = base_model()(x)
        model = lora_model(dropout=0.1)
        got = model(x)
    assert len(lora_layers(model)) == 2 * len(DEFAULT_TARGETS)
    assert all(layer.lora_B.weight.abs().sum() == 0 and layer.lora_A.weight.abs().sum() > 0
               for layer in lora_layers(model).values())
    assert torch.equal(got, ref)


def test_lora_a_is_initialised_like_peft_kaiming_uniform():
    """Kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in)); its variance is 1/(3 in)."""
    model = base_model()
    apply_lora(model, r=64, alpha=8, target_modules=["gate_proj"])
    a = model.layers[0].mlp.gate_proj.lora_A.weight
    bound = 1 / math.sqrt(CFG["dim"])
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert abs(a.var().item() - bound ** 2 / 3) < 0.1 * bound ** 2 / 3


def test_only_adapter_parameters_train_and_the_base_is_unchanged_after_a_step():
    model = lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    x = tokens()
    model.train()
    model(x[:, :-1], targets=x[:, 1:]).backward()
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)
    assert all(p.grad is not None for p in lora_parameters(model))
    train_steps(model, steps=2)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(model).values())


def test_merged_equals_unmerged_and_unmerge_restores_the_base():
    model = train_steps(lora_model())
    base_weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    x = tokens()
    with torch.no_grad():
        unmerged = model(x)
        merge(model)
        merged = model(x)
        assert all(layer.merged for layer in lora_layers(model).values())
        unmerge(model)
        again = model(x)
    assert (merged - unmerged).abs().max() <= 1e-5
    assert (again - unmerged).abs().max() <= 1e-5  # unmerge restores the base up to rounding
    restored = model.state_dict()
    assert max((restored[k] - v).abs().max().item() for k, v in base_weights.items()) <= 1e-6
    with torch.no_grad():
        adapted_vs_base = (unmerged - base_model()(x)).abs().max()
    assert adapted_vs_base > 1e-3  # the adapter does change outputs, so the comparison above means something


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs():
    model = train_steps(lora_model())
    x = tokens()
    with torch.no_grad():
        ref = model(x)
        plain = merge_and_unload(model)
        got = plain(x)
    assert not lora_layers(plain)
    assert set(plain.state_dict()) == set(base_model().state_dict())
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_is_alpha_over_r_or_alpha_over_sqrt_r(use_rslora):
    r, alpha = 16, 4.0
    model = base_model()
    apply_lora(model, r=r, alpha=alpha, target_modules=["q_proj"], use_rslora=use_rslora)
    layer = model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, CFG["dim"])
    expected_scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    with torch.no_grad():
        expected = x @ layer.base_layer.weight.T + expected_scale * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_adapters_disabled_gives_the_base_outputs_exactly_and_restores_the_adapter():
    model = train_steps(lora_model())
    x = tokens()
    with torch.no_grad():
        ref = base_model()(x)
        adapted = model(x)
        with adapters_disabled(model):
            off = model(x)
        back = model(x)
    assert torch.equal(off, ref)
    assert torch.equal(back, adapted)
    assert not torch.equal(adapted, ref)


def test_adapters_disabled_on_a_merged_model_unmerges_for_the_block():
    model = train_steps(lora_model())
    x = tokens()
    with torch.no_grad():
        ref = base_model()(x)
        merge(model)
        merged = model(x)
        with adapters_disabled(model):
            off = model(x)
        back = model(x)
    assert (off - ref).abs().max() <= 1e-5
    assert all(layer.merged for layer in lora_layers(model).values())
    assert (back - merged).abs().max() <= 1e-5


def test_dropout_is_applied_to_the_adapter_input_in_training_only():
    model = lora_model(dropout=0.5, target_modules=["q_proj"])
    layer = model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, CFG["dim"])
    layer.train()
    with torch.no_grad():
        assert not torch.equal(layer(x), layer(x))
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))


def test_bad_arguments_are_user_errors():
    for kwargs in (dict(r=0), dict(alpha=-1), dict(dropout=1.0), dict(target_modules=["nope"]),
                   dict(target_modules="q_proj"), dict(quantize_base="int3"), dict(target_modules=["lm_head"])):
        with pytest.raises(LmforgeError):
            apply_lora(base_model(), **kwargs)
    model = lora_model()
    with pytest.raises(LmforgeError, match="already"):
        apply_lora(model)
    with pytest.raises(LmforgeError, match="no LoRA"):
        merge(base_model())


# --- the PEFT layout ------------------------------------------------------------------------------
def test_saved_adapter_has_the_peft_layout_and_loads_back(tmp_path):
    model = train_steps(lora_model(use_rslora=True, dropout=0.05))
    out = save_adapter(model, tmp_path / "adapter", base_model_name_or_path="base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (4, 8, 0.05, True)
    assert config["target_modules"] == DEFAULT_TARGETS and config["base_model_name_or_path"] == "base"
    from safetensors.torch import load_file
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * len(lora_layers(model))
    fresh = load_adapter(base_model(), out)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    save_adapter(model, tmp_path / "adapter")  # an adapter folder may be replaced by a new adapter
    with pytest.raises(LmforgeError):
        load_adapter(base_model(), tmp_path)  # not an adapter folder


def test_adapter_for_another_shape_is_refused(tmp_path):
    out = save_adapter(train_steps(lora_model()), tmp_path / "adapter")
    torch.manual_seed(0)
    other = Transformer(ModelConfig(**{**CFG, "dim": 48}))
    with pytest.raises(LmforgeError, match="shape"):
        load_adapter(other, out)
    assert not lora_layers(other)  # refused before anything was changed


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_loads_our_adapter_onto_transformers_llama_with_equal_logits(tmp_path, use_rslora):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    save_hf(base_model(), tmp_path / "hf")  # same seed: the same base weights
    model = train_steps(lora_model(use_rslora=use_rslora, alpha=16, dropout=0.1).double())
    assert all(layer.lora_B.weight.abs().min() > 0 for layer in lora_layers(model).values())
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "hf"))

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float64)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert peft_model.peft_config["default"].use_rslora == use_rslora
    x = tokens(shape=(2, 20))
    with torch.no_grad():
        ours, theirs = model(x), peft_model(x).logits
        with adapters_disabled(model), peft_model.disable_adapter():
            ours_base, theirs_base = model(x), peft_model(x).logits
    assert (ours - ours_base).abs().max() > 1e-2  # the adapters matter
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours_base - theirs_base).abs().max() <= 1e-5
