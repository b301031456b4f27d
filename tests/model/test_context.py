"""The one prompt-fitting rule, and that the reference sampler and the engine both follow it."""
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.context import fit_to_context
from lmforge.model.sampling import generate


@pytest.mark.parametrize("n_prompt, max_tokens, context, kept, allowed", [
    (10, 5, 64, 10, 5),      # fits: untouched
    (60, 10, 64, 54, 10),    # too long: the prompt loses its head, max_tokens is kept
    (10, 500, 64, 1, 63),    # max_tokens beyond the context: clamped, one prompt token left
    (3, 1, 2, 1, 1),
])
def test_fit_keeps_the_prompt_tail_and_clamps_max_tokens(n_prompt, max_tokens, context, kept, allowed):
    prompt = list(range(n_prompt))
    ids, n = fit_to_context(prompt, max_tokens, context)
    assert (len(ids), n) == (kept, allowed) and ids == prompt[n_prompt - kept:]
    assert len(ids) + n <= context


def test_fit_refuses_what_cannot_fit():
    with pytest.raises(LmforgeError):
        fit_to_context([], 5, 64)
    with pytest.raises(LmforgeError):
        fit_to_context([1, 2], 5, 1)


def test_reference_generate_and_engine_agree_on_an_overlong_prompt():
    from lmforge.serve.engine import EngineConfig, LLMEngine
    from lmforge.serve.sequence import SamplingParams
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(["def add(a, b):\n    return a + b\n"] * 4, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                                    max_seq_len=32)).eval()
    prompt = [int(t) for t in torch.randint(0, tok.vocab_size, (50,))]
    ref = list(generate(model, prompt, 10, temperature=0))
    assert len(ref) == 10
    ids, n = fit_to_context(prompt, 10, 32)
    engine = LLMEngine(model, tok, EngineConfig(num_blocks=8, block_size=16, max_num_seqs=1))
    out = engine.generate([ids], [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)])[0]
    assert out["token_ids"] == ref
