"""`model.attention=blockwise` routes the Transformer's causal attention through the exact
blockwise kernel (model/attention.py): logits, loss and every parameter's gradient equal the SDPA
model's with the same weights (fp64, blocks that do not divide the length), set from a recipe."""
import pytest
import torch

from lmforge.config import load_recipe
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer, layers
from lmforge.train.config import TrainRecipe

SHAPE = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


def forward_backward(cfg, tokens):
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    logits = model(tokens[:, :-1])
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("block", [1, 5, 128])
def test_blockwise_transformer_equals_sdpa(block, monkeypatch):
    calls = []
    kernel = layers.blockwise_attention
    monkeypatch.setattr(layers, "blockwise_attention", lambda *a: calls.append(a[3:]) or kernel(*a))
    tokens = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = forward_backward(ModelConfig(**SHAPE), tokens)
    assert not calls
    got = forward_backward(ModelConfig(**SHAPE, attention="blockwise", attention_block=block), tokens)
    assert (got[0] - ref[0]).abs().max() < 1e-10
    assert abs(got[1] - ref[1]) < 1e-12
    assert got[2].keys() == ref[2].keys()
    assert max((got[2][n] - ref[2][n]).abs().max() for n in ref[2]) < 1e-10
    assert calls == [(True, block, block)] * 4  # every layer, both forwards: the kernel did the work


def test_switch_from_a_recipe_and_bad_values():
    recipe = load_recipe(TrainRecipe, None, ["model.preset=tiny", "model.attention=blockwise",
                                             "model.attention_block=64"])
    cfg = recipe.model_config(vocab_size=100)
    assert (cfg.attention, cfg.attention_block) == ("blockwise", 64)
    assert Transformer(cfg).layers[0].self_attn.block == 64
    with pytest.raises(LmforgeError, match="attention must be one of"):
        ModelConfig(**SHAPE, attention="flash")
    with pytest.raises(LmforgeError, match="attention_block must be positive"):
        ModelConfig(**SHAPE, attention="blockwise", attention_block=0)
