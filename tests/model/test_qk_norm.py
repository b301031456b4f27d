"""QK-norm against a hand-written attention and against transformers' Qwen3 (Llama + per-head
q/k RMSNorm); the new config fields through checkpoints; exports refuse what they cannot express."""
import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer, load, save, save_hf
from lmforge.model.layers import Attention, rope_cos_sin, rope_inv_freq

CFG = dict(vocab_size=97, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=32,
           norm_eps=1e-6)


def reference_attention(x, attn, cfg):
    """Per-head RMSNorm of q and k (learned [head_dim] weights), rotate-half RoPE, causal GQA
    softmax attention, output projection: written out with loops, fp64."""
    B, T, _ = x.shape
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = (x @ attn.q_proj.weight.t()).view(B, T, H, D)
    k = (x @ attn.k_proj.weight.t()).view(B, T, Hkv, D)
    v = (x @ attn.v_proj.weight.t()).view(B, T, Hkv, D)
    q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * attn.q_norm.weight
    k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * attn.k_norm.weight
    half = D // 2
    freq = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq          # [T, D/2]
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]

    def rope(t):
        a, b = t[..., :half], t[..., half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    q, k = rope(q), rope(k)
    out = torch.zeros(B, T, H, D, dtype=x.dtype)
    for h in range(H):
        kv = h // (H // Hkv)
        for t in range(T):
            s = (k[:, :t + 1, kv] @ q[:, t, h, :, None]).squeeze(-1) / math.sqrt(D)   # [B, t+1]
            out[:, t, h] = (torch.softmax(s, -1)[:, None] @ v[:, :t + 1, kv]).squeeze(1)
    return out.reshape(B, T, H * D) @ attn.o_proj.weight.t()


def test_qk_norm_attention_equals_hand_written_reference_fp64():
    cfg = ModelConfig(**CFG, qk_norm=True)
    torch.manual_seed(0)
    attn = Attention(cfg).double()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (cfg.head_dim,)
    x = torch.randn(2, 9, cfg.dim, dtype=torch.float64)
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), torch.arange(9).expand(2, 9), torch.float64)
    # atol: the model keeps RoPE frequencies in fp32, the reference in fp64
    torch.testing.assert_close(attn(x, cos, sin), reference_attention(x, attn, cfg), atol=1e-6, rtol=0)


def qk_model(**kw):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG, qk_norm=True, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


def test_new_fields_survive_a_checkpoint(tmp_path):
    model = qk_model(logit_softcap=15.0)
    save(model, tmp_path / "m")
    back = load(tmp_path / "m")
    assert back.cfg.qk_norm and back.cfg.logit_softcap == 15.0 and back.cfg == model.cfg
    x = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)


def test_defaults_add_no_parameters_and_old_configs_load():
    plain = ModelConfig(**CFG)
    assert not plain.qk_norm and plain.logit_softcap is None
    assert not any("q_norm" in n for n, _ in Transformer(plain).named_parameters())
    qk = ModelConfig(**CFG, qk_norm=True)
    assert Transformer(qk).num_params() == qk.num_params() == plain.num_params() + 2 * 2 * qk.head_dim
    old = {k: v for k, v in plain.to_dict().items() if k not in ("qk_norm", "logit_softcap")}
    assert ModelConfig.from_dict(old) == plain  # a checkpoint written before these fields existed
    with pytest.raises(LmforgeError, match="logit_softcap must be positive"):
        ModelConfig(**CFG, logit_softcap=0.0)


def test_exports_refuse_what_the_format_cannot_express(tmp_path):
    with pytest.raises(LmforgeError, match="logit soft-capping.*lmforge checkpoint"):
        save_hf(Transformer(ModelConfig(**CFG, logit_softcap=30.0)), tmp_path / "hf")
    pytest.importorskip("gguf")
    from lmforge.quant.gguf_export import export_gguf
    for kw, what in [({"qk_norm": True}, "QK-norm"), ({"logit_softcap": 30.0}, "soft-capping")]:
        with pytest.raises(LmforgeError, match=f"GGUF export: .*{what}"):
            export_gguf(Transformer(ModelConfig(**CFG, **kw)), None, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "hf").exists()


def test_qk_norm_model_round_trips_through_transformers_qwen3(tmp_path):
    """Qwen3 is Llama plus per-head q/k RMSNorm before RoPE: our save_hf output loads in
    transformers as Qwen3 with equal logits, and a transformers Qwen3 loads back into ours."""
    transformers = pytest.importorskip("transformers")
    ours = qk_model()
    save_hf(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)
        hf.model.layers[1].self_attn.k_norm.weight.mul_(1.3)  # a change only a mapped k_norm carries
        hf.save_pretrained(tmp_path / "hf2", safe_serialization=True)
        back = load(tmp_path / "hf2")
        assert back.cfg.qk_norm
        torch.testing.assert_close(back(x), hf(x).logits, atol=1e-4, rtol=0)
