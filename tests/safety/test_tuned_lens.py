"""Tuned lens: untrained it is the logit lens; its last layer is the model's logits, trained or not;
fitting lowers every earlier layer's held-out KL to the final distribution below the logit lens's."""
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.safety.interp import logit_lens
from lmforge.safety.tuned_lens import TunedLens, fit_tuned_lens, lens_kl

CFG = ModelConfig(vocab_size=40, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)


def model():
    torch.manual_seed(0)
    m = Transformer(CFG).double().eval()
    for p in m.parameters():
        p.data += 0.05 * torch.randn_like(p)
    return m


def test_untrained_is_the_logit_lens_and_the_last_layer_is_the_logits():
    m = model()
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    lens = TunedLens(CFG.dim, CFG.n_layers).double()
    torch.testing.assert_close(lens(m, tokens), logit_lens(m, tokens), rtol=0, atol=1e-12)


def test_fitting_beats_the_logit_lens_on_held_out_tokens_and_keeps_the_last_layer_exact():
    m = model()
    gen = torch.Generator().manual_seed(2)
    train = [torch.randint(0, 40, (8, 16), generator=gen) for _ in range(4)]
    held_out = torch.randint(0, 40, (8, 16), generator=gen)
    lens = fit_tuned_lens(m, train, steps=150, lr=3e-3)
    with torch.no_grad():
        final = m(held_out)
        tuned = lens(m, held_out)
        plain = logit_lens(m, held_out)
    torch.testing.assert_close(tuned[-1], final, rtol=0, atol=1e-12)
    kl_tuned, kl_plain = lens_kl(tuned[:-1], final), lens_kl(plain[:-1], final)
    assert (kl_tuned < 0.7 * kl_plain).all(), (kl_tuned, kl_plain)
    assert all(p.requires_grad for p in m.parameters())  # the model is left trainable as it was
