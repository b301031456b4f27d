import torch

from lmforge.model import ModelConfig, Transformer, lm_loss
from lmforge.model.fused_loss import linear_cross_entropy


def test_fused_loss_and_grads_match_plain_cross_entropy():
    torch.manual_seed(0)
    h = torch.randn(300, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 32, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    t[::7] = -100  # ignored positions
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t, ignore_index=-100)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, t, chunk_rows=64)
    (got * 3).backward()  # a non-unit upstream gradient
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(h.grad, 3 * gh)
    torch.testing.assert_close(w.grad, 3 * gw)


def test_model_targets_path_equals_logits_path_with_tied_head():
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=32, tie_embeddings=True)
    torch.manual_seed(0)
    a = Transformer(cfg)
    b = Transformer(cfg)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 97, (3, 17))
    la = lm_loss(a(x[:, :-1]), x[:, 1:])
    lb = b(x[:, :-1], targets=x[:, 1:])
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-4, msg=name)
