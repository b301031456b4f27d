"""Our logits equal transformers' Llama logits on converted weights, in both directions."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.model import ModelConfig, Transformer, load, save, save_hf


def hf_llama(tmp_path, tie=False, rope_scaling=None, hidden_size=64, heads=8):
    cfg = transformers.LlamaConfig(
        vocab_size=257, hidden_size=hidden_size, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        **({"rope_scaling": rope_scaling} if rope_scaling else {}))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so a mis-mapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_hf_to_lmforge_logits_match(tmp_path, tie):
    hf = hf_llama(tmp_path, tie=tie)
    ours = load(tmp_path / "hf")
    tokens = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    assert ours.cfg.n_kv_heads == 2 and ours.cfg.tie_embeddings == tie
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_llama3_rope_scaling_matches(tmp_path):
    """head_dim 32, theta 5000 and an original context of 32 put three frequencies inside the
    blend band (wavelength between 32/high and 32/low), plus some on each side of it, so the
    interpolation branch is compared too, not only the keep/divide branches."""
    old_len, low, high = 32, 1.0, 4.0
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": old_len}
    head_dim, theta = 32, 5000.0
    wavelengths = [2 * math.pi * theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    in_band = [w for w in wavelengths if old_len / high <= w <= old_len / low]
    assert len(in_band) >= 1, wavelengths
    assert any(w < old_len / high for w in wavelengths) and any(w > old_len / low for w in wavelengths)
    hf = hf_llama(tmp_path, rope_scaling=scaling, hidden_size=128, heads=4)
    ours = load(tmp_path / "hf")
    assert ours.cfg.rope_scaling["factor"] == 8.0 and ours.cfg.head_dim == head_dim
    tokens = torch.randint(0, 257, (1, 100))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shard", [None, 60_000])
def test_lmforge_to_hf_logits_match(tmp_path, shard):
    cfg = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)
    torch.manual_seed(1)
    ours = Transformer(cfg).eval()
    save_hf(ours, tmp_path / "out", max_shard_bytes=shard)
    if shard:
        assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 300, (3, 33))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=1e-4, rtol=0)
    # and back again, through our own checkpoint format
    save(load(tmp_path / "out"), tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "ckpt")(tokens), ours(tokens), atol=0, rtol=0)
