"""Interpretability invariants on a small lmforge model (fp64): the logit lens at the last layer is
the logits, recomputed attention patterns reproduce the fused attention's output, patching the whole
clean residual stream restores the clean metric exactly, and an induction head grows in a 2-layer
attention-only model but not in a 1-layer one."""
import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.safety.interp import (
    activation_patching,
    attention_only,
    attention_patterns,
    attribution_patching,
    head_scores,
    logit_difference,
    logit_lens,
    patch_all_positions,
    repeated_random_tokens,
    shifted_repeats,
)

CFG = ModelConfig(vocab_size=40, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)


def model(seed=0):
    torch.manual_seed(seed)
    m = Transformer(CFG).double().eval()
    for p in m.parameters():  # non-trivial norms too
        p.data += 0.05 * torch.randn_like(p)
    return m


def test_final_layer_logit_lens_equals_the_logits():
    m = model()
    tokens = torch.randint(0, 40, (2, 11))
    lens = logit_lens(m, tokens)
    assert lens.shape == (3, 2, 11, 40)
    torch.testing.assert_close(lens[-1], m(tokens), rtol=0, atol=1e-12)
    assert (lens[0] - m(tokens)).abs().max() > 1e-3  # earlier layers differ


def test_attention_patterns_reproduce_the_attention_output():
    m = model()
    tokens = torch.randint(0, 40, (2, 9))
    patterns = attention_patterns(m, tokens)  # [L, B, H, T, T]
    torch.testing.assert_close(patterns.sum(-1), torch.ones(3, 2, 4, 9, dtype=torch.float64))
    assert patterns.triu(1).abs().max() == 0  # causal
    seen = {}
    attn = m.layers[1].self_attn
    h1 = attn.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    h2 = attn.register_forward_hook(lambda mod, args, out: seen.update(out=out))
    m(tokens)
    h1.remove(), h2.remove()
    v = attn.v_proj(seen["x"]).view(2, 9, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    mixed = (patterns[1] @ v).transpose(1, 2).reshape(2, 9, -1)
    torch.testing.assert_close(attn.o_proj(mixed), seen["out"], rtol=1e-10, atol=1e-12)


def test_patching_restores_the_clean_metric():
    m = model(1)
    clean = torch.randint(0, 40, (1, 8))
    corrupt = clean.clone()
    corrupt[0, 2] = (clean[0, 2] + 7) % 40
    metric = logit_difference(3, 5)
    with torch.no_grad():
        clean_value, corrupt_value = float(metric(m(clean))), float(metric(m(corrupt)))
    assert abs(clean_value - corrupt_value) > 1e-3
    for layer in range(-1, 3):  # every position patched: exactly the clean run
        assert patch_all_positions(m, clean, corrupt, layer, metric) == pytest.approx(clean_value, abs=1e-12)
    grid = activation_patching(m, clean, corrupt, metric)  # [L+1, T]
    assert grid[-1, -1] == pytest.approx(clean_value, abs=1e-12)  # last block, last position: all that is read
    assert grid[-1, :-1] == pytest.approx([corrupt_value] * 7, abs=1e-12)
    assert grid[0, 2] == pytest.approx(clean_value, abs=1e-12)  # the only corrupted embedding
    assert grid[0, 3:] == pytest.approx([corrupt_value] * 5, abs=1e-12)  # identical embeddings: no change
    attribution = attribution_patching(m, clean, corrupt, metric)
    assert attribution[-1, :-1].abs().max() == 0 and attribution[0, 3:].abs().max() == 0
    # the first-order estimate points the same way as the exact effect where it is large
    exact = grid - corrupt_value
    assert torch.corrcoef(torch.stack([exact.flatten(), attribution.flatten()]))[0, 1] > 0.5


def test_head_scores_on_hand_made_patterns():
    half = 5
    T = 2 * half
    induction = torch.zeros(T, T)
    previous = torch.zeros(T, T)
    for t in range(T):
        previous[t, max(t - 1, 0)] = 1
        induction[t, t - half + 1 if t >= half else 0] = 1
    patterns = torch.stack([previous, induction])[None, None].expand(1, 3, 2, T, T)  # [L, B, H, T, T]
    ind, prev = head_scores(patterns, half)
    assert ind[0].tolist() == [0.0, 1.0] and prev[0].tolist() == [1.0, pytest.approx(1 / 9)]


STEPS = 350  # the 2-layer model's induction head forms between steps 200 and 300 (score 0.1 -> 0.83)


def grow(n_layers: int, steps: int) -> float:
    torch.manual_seed(0)
    m = attention_only(Transformer(ModelConfig(vocab_size=64, dim=64, n_layers=n_layers, n_heads=4,
                                               hidden_dim=64, max_seq_len=64)))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for step in range(steps):
        x = shifted_repeats(64, 32, 32, seed=step + 1)
        loss = m(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    induction, _ = head_scores(attention_patterns(m, repeated_random_tokens(64, 16, 8, seed=0)), 16)
    return float(induction.max())


@pytest.mark.slow
def test_induction_head_grows_in_two_layers_not_one():
    assert grow(2, STEPS) > 0.5
    assert grow(1, STEPS) < 0.3


def test_interp_command_writes_heatmaps_and_a_lens_that_ends_at_the_logits(tmp_path):
    import json

    from lmforge.cli import run
    from lmforge.model import save
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(["def add(a, b):\n    return a + b\n" * 10], vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=2, n_heads=2, n_kv_heads=1,
                                hidden_dim=32, max_seq_len=64))
    save(m, tmp_path / "model", tokenizer=tok)
    out = tmp_path / "interp"
    prompt, corrupt = "def add(a, b):", "def add(b, a):"
    assert len(tok.encode(prompt)) == len(tok.encode(corrupt))
    (tmp_path / "lens.txt").write_text("def add(a, b):\n    return a + b\n" * 30)
    assert run(["safety", "interp", str(tmp_path / "model"), "--prompt", prompt, "--corrupt", corrupt,
                "--out", str(out), "--tuned-lens", str(tmp_path / "lens.txt"), "--tuned-lens-steps", "3"]) == 0
    result = json.loads((out / "interp.json").read_text())
    with torch.no_grad():
        best = int(m(torch.tensor([tok.encode(prompt)]))[0, -1].argmax())
    assert result["logit_lens"][-1]["top"][0]["token"] == tok.decode([best])
    assert result["tuned_lens"][-1] == result["logit_lens"][-1] and len(result["tuned_lens"]) == 2
    for name in ("attention_layer0", "attention_layer1", "induction_heads", "activation_patching",
                 "attribution_patching"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert run(["safety", "interp", str(tmp_path / "model"), "--prompt", prompt, "--corrupt", "x",
                "--out", str(out)]) == 2  # a corrupted prompt of another length: a clear error
