"""The one scorer (lmforge.model.scoring): checked against a plain full-sequence forward, against a
per-token reference loop, and shown to be the number every caller reports (train's validation
loss, int8-report's perplexity, eval's bits per byte and rolling log-likelihood)."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer
from lmforge.model.scoring import score_tokens, windows

VOCAB = 50


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=16)
    net = Transformer(cfg).eval()
    with torch.no_grad():
        net.lm_head.weight.mul_(4.0)  # sharper predictions: context matters, so window bugs show
    return net


def tokens(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


def reference_nll(model, ids, window: int, stride: int, counted=lambda token: True) -> tuple[float, int]:
    """Token by token: token i (i >= 1) is predicted from tokens[b:i], where b is the start of the
    first window (begin = k * stride, inputs [begin, begin + window)) that still had i to predict."""
    total, n = 0.0, 0
    for i in range(1, len(ids)):
        if not counted(ids[i]):
            continue
        b = 0 if i <= window else math.ceil((i - window) / stride) * stride
        with torch.no_grad():
            logits = model(torch.as_tensor(ids[b:i])[None])[0, -1].double()
        total -= float(F.log_softmax(logits, -1)[ids[i]])
        n += 1
    return total, n


def test_short_text_is_one_full_forward(model):
    ids = torch.as_tensor(tokens(12))
    with torch.no_grad():
        full = F.cross_entropy(model(ids[None, :-1])[0], ids[1:], reduction="sum").item()
    score = score_tokens(model, ids.numpy())
    assert score.tokens == 11 and score.nll == pytest.approx(full, rel=1e-5)
    assert score.loss == pytest.approx(full / 11, rel=1e-5) and score.perplexity == pytest.approx(math.exp(full / 11))


@pytest.mark.parametrize("window,stride,batch", [(16, 16, 8), (16, 16, 1), (16, 5, 3), (8, 1, 4), (7, 7, 2)])
def test_long_text_equals_a_token_by_token_reference(model, window, stride, batch):
    ids = tokens(61)  # 60 targets: several windows and a partial last one
    nll, n = reference_nll(model, ids, window, stride)
    score = score_tokens(model, ids, window=window, stride=stride, batch_size=batch)
    assert score.tokens == n == 60
    assert score.nll == pytest.approx(nll, rel=1e-5)


def test_windows_score_every_target_once():
    for n, w, s in [(2, 4, 4), (61, 16, 5), (100, 8, 1), (17, 16, 16), (18, 16, 16)]:
        scored = [t for _, end, first in windows(n, w, s) for t in range(first, end + 1)]
        assert scored == list(range(1, n))
        assert all(end - begin <= w for begin, end, _ in windows(n, w, s))


def test_zero_byte_tokens_are_left_out_and_bytes_counted(model):
    ids = tokens(40)
    token_bytes = np.arange(VOCAB) % 4  # every fourth id stands for no bytes (like EOS)
    score = score_tokens(model, ids, token_bytes=token_bytes)
    nll, n = reference_nll(model, ids, 16, 16, counted=lambda t: token_bytes[t] > 0)
    assert (score.tokens, score.nll) == (n, pytest.approx(nll, rel=1e-5))
    assert score.bytes == int(token_bytes[ids[1:]].sum())
    assert score.bits_per_byte == pytest.approx(nll / math.log(2) / score.bytes, rel=1e-5)


def test_bad_arguments_are_refused(model):
    with pytest.raises(ValueError, match="at least 2"):
        score_tokens(model, [3])
    with pytest.raises(ValueError, match="stride"):
        score_tokens(model, tokens(10), window=8, stride=9)


def test_train_int8_report_and_eval_report_the_same_number(model, tmp_path):
    """Train's val loss, int8-report's perplexity, eval's bits_per_byte and the eval backend's
    rolling log-likelihood of one text, all in windows of max_seq_len: one number."""
    from lmforge.data.shards import ShardWriter, TokenShards
    from lmforge.eval.bpb import bits_per_byte
    from lmforge.eval.local_backend import LocalBackend
    from lmforge.serve.perplexity import perplexity
    from lmforge.tokenizer import train_tokenizer
    from lmforge.train.trainer import evaluate_loss

    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 4 + "print(add(1, 2))\n"
    tok = train_tokenizer([text], vocab_size=VOCAB + 300, min_frequency=1)
    torch.manual_seed(1)
    net = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                  hidden_dim=64, max_seq_len=16)).eval()
    backend = LocalBackend(net, tok)
    ids = [backend.prefix_id] + tok.encode(text)
    assert len(ids) > 3 * 16 and (len(ids) - 1) % 16  # several windows and a partial last one

    (nats, n), = backend.loglikelihood_rolling([text])
    reference, n_ref = reference_nll(net, ids, 16, 16)
    assert n == n_ref == len(ids) - 1 and -nats == pytest.approx(reference, rel=1e-5)
    loss = reference / n

    writer = ShardWriter(tmp_path, tok.vocab_size, tok.eos_id)
    writer.add("val", ids)
    writer.close()
    val_loss = evaluate_loss(net, TokenShards(tmp_path, "val"), seq_len=16, n_tokens=len(ids) - 1, batch=3,
                             autocast=contextlib.nullcontext)
    ppl = perplexity(net, ids, window=16)
    bpb = bits_per_byte(net, np.asarray(ids), tok.token_byte_lengths(), seq_len=16, batch_size=5)

    assert val_loss == pytest.approx(loss, rel=1e-5)
    assert math.log(ppl) == pytest.approx(loss, rel=1e-5)
    assert bpb["loss"] == pytest.approx(loss, rel=1e-5) and bpb["tokens"] == n
    assert bpb["bpb"] == pytest.approx(reference / math.log(2) / len(text.encode()), rel=1e-5)
