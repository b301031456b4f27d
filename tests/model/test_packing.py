"""Packed documents and padded batches compute exactly what each sequence computes alone."""
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.model.packing import doc_ids_from_lengths

CFG = ModelConfig(vocab_size=101, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


def model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return Transformer(CFG).to(dtype)


def test_packed_row_equals_each_document_alone_fp64():
    m = model()
    lengths = [5, 9, 1, 7]
    docs = [torch.randint(0, 101, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    with torch.no_grad():
        got = m(packed, doc_ids=doc_ids_from_lengths(lengths))
        alone = torch.cat([m(d) for d in docs], dim=1)
    torch.testing.assert_close(got, alone, atol=1e-12, rtol=0)


def test_packed_batch_fp32_and_reused_ids_start_new_documents():
    m = model(torch.float32)
    # row 0: three documents, the third reusing id 0 (a new run is a new document); row 1: two
    doc_ids = torch.tensor([[0] * 6 + [1] * 4 + [0] * 5, [3] * 11 + [4] * 4])
    tokens = torch.randint(0, 101, (2, 15))
    with torch.no_grad():
        got = m(tokens, doc_ids=doc_ids)
        spans = [(0, 0, 6), (0, 6, 10), (0, 10, 15), (1, 0, 11), (1, 11, 15)]
        for row, a, b in spans:
            torch.testing.assert_close(got[row, a:b], m(tokens[row:row + 1, a:b])[0], atol=1e-5, rtol=0)


def test_packed_gradients_equal_separate_documents():
    lengths = [6, 4, 8]
    docs = [torch.randint(0, 101, (1, n + 1)) for n in lengths]
    packed_in = torch.cat([d[:, :-1] for d in docs], dim=1)
    packed_tg = torch.cat([d[:, 1:] for d in docs], dim=1)
    a, b = model(), model()
    a.token_logprobs(packed_in, packed_tg, doc_ids=doc_ids_from_lengths(lengths)).sum().backward()
    sum(b.token_logprobs(d[:, :-1], d[:, 1:]).sum() for d in docs).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-10, rtol=0, msg=name)


def padded(seqs, length, left: bool, pad=0):
    tokens = torch.full((len(seqs), length), pad)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(length - len(s), length) if left else slice(0, len(s))
        tokens[i, cols], mask[i, cols] = s, 1
    return tokens, mask


def real(x, mask):
    return [x[i][mask[i].bool()] for i in range(len(x))]


def test_left_padding_equals_right_padding_equals_no_padding():
    m = model()
    seqs = [torch.randint(0, 101, (n,)) for n in (10, 6, 1, 3)]
    with torch.no_grad():
        alone = [m(s[None])[0] for s in seqs]
        for left in (True, False):
            tokens, mask = padded(seqs, 10, left)
            out = m(tokens, attention_mask=mask)
            assert torch.isfinite(out).all()  # padded queries see themselves, never an empty row
            for got, ref in zip(real(out, mask), alone):
                torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_left_padded_gradients_equal_unpadded():
    seqs = [torch.randint(0, 101, (n,)) for n in (9, 4)]
    a, b = model(), model()
    tokens, mask = padded(seqs, 9, left=True)
    targets = torch.where(mask.bool(), torch.roll(tokens, -1, dims=1), -100)
    targets[:, -1] = -100
    a.token_logprobs(tokens, targets, attention_mask=mask).sum().backward()
    sum(b.token_logprobs(s[None, :-1], s[None, 1:]).sum() for s in seqs).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.isfinite(pa.grad).all(), name
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-10, rtol=0, msg=name)


def test_left_padding_matches_transformers_with_attention_mask(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.model import save_hf
    m = model(torch.float32).eval()
    save_hf(m, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens, mask = padded([torch.randint(0, 101, (n,)) for n in (12, 5)], 12, left=True)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, position_ids=positions).logits
        got = m(tokens, attention_mask=mask)
    for g, r in zip(real(got, mask), real(ref, mask)):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=0)


def test_unmasked_calls_keep_the_causal_fast_path_bit_identical():
    m = model(torch.float32)
    tokens = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        plain = m(tokens)
        torch.testing.assert_close(m(tokens, attention_mask=torch.ones(2, 12)), plain, atol=0, rtol=0)


def test_gradient_checkpointing_passes_the_mask():
    a, b = model(), model()
    b.gradient_checkpointing = True
    a.train(), b.train()
    tokens = torch.randint(0, 101, (1, 14))
    doc_ids = doc_ids_from_lengths([8, 6])
    a(tokens, doc_ids=doc_ids).sum().backward()
    b(tokens, doc_ids=doc_ids).sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-12, rtol=0, msg=name)


def test_bad_layouts_are_user_errors():
    m = model(torch.float32)
    tokens = torch.randint(0, 101, (2, 6))
    with pytest.raises(LmforgeError, match="doc_ids must have the tokens' shape"):
        m(tokens, doc_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(LmforgeError, match="attention_mask must have"):
        m(tokens, attention_mask=torch.ones(6))
    with pytest.raises(LmforgeError, match="KV cache"):
        m(tokens, cache=KVCache(CFG, 2, 8, dtype=torch.float32), doc_ids=torch.zeros(2, 6, dtype=torch.long))


def test_derived_positions_restart_per_document_and_count_real_tokens():
    """RoPE attention only sees position differences, so logits cannot tell whether positions
    restart; check the derived positions themselves (what a position-dependent head would get)."""
    from lmforge.model.packing import packed_layout
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0, 0]])
    positions, _ = packed_layout(doc_ids.shape, doc_ids, None, "cpu")
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    positions, allowed = packed_layout(mask.shape, None, mask, "cpu")
    assert positions.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]  # HF's cumsum - 1 (clamped)
    assert allowed[0, 0, 4].tolist() == [False, False, True, True, True]
