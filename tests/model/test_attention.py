"""Blockwise attention (online softmax over query/key blocks) equals the full softmax, and
PyTorch's own SDPA, in fp64: outputs, row log-sum-exp and gradients, for every block size against
ragged lengths (blocks that do not divide T), GQA, causal or not, queries offset into the keys."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.attention import attention_forward, blockwise_attention, merge_partials, naive_attention

TOL = 1e-10


def inputs(T, S, H=4, Hkv=2, D=8, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64) for h, n in ((H, T), (Hkv, S), (Hkv, S)))
    return q, k, v


@pytest.mark.parametrize("T,block", list(itertools.product([1, 5, 17, 33], [1, 3, 16, 64])))
def test_forward_and_lse_equal_naive_and_sdpa(T, block):
    q, k, v = inputs(T, T)
    pos = torch.arange(T)
    for causal in (True, False):
        out, lse = attention_forward(q, k, v, pos, pos, causal, block, max(1, block // 2 + 1))
        ref_out, ref_lse = naive_attention(q, k, v, causal)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        assert (out - ref_out).abs().max() < TOL and (out - sdpa).abs().max() < TOL
        assert (lse - ref_lse).abs().max() < TOL


@pytest.mark.parametrize("T,S,block", [(7, 19, 4), (1, 13, 5), (16, 16, 3), (10, 40, 64)])
def test_gradients_equal_autograd_through_the_full_softmax(T, S, block):
    q, k, v = inputs(T, S, seed=T + S)
    dout = torch.randn_like(q)
    grads = []
    for fn in (lambda q, k, v: blockwise_attention(q, k, v, True, block, block, q_offset=S - T),
               lambda q, k, v: naive_attention(q, k, v, True, torch.arange(S - T, S), torch.arange(S))[0]):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout)
        grads.append([out.detach(), *(t.grad for t in leaves)])
    for a, b in zip(*grads):
        assert (a - b).abs().max() < TOL


def test_merging_two_key_halves_equals_attention_over_all_keys():
    q, k, v = inputs(9, 20)
    qp, kp = torch.arange(11, 20), torch.arange(20)
    a = attention_forward(q, k[:, :, :8], v[:, :, :8], qp, kp[:8], True, 4, 4)
    b = attention_forward(q, k[:, :, 8:], v[:, :, 8:], qp, kp[8:], True, 4, 4)
    out, lse = merge_partials(*a, *b)
    ref_out, ref_lse = naive_attention(q, k, v, True, qp, kp)
    assert (out - ref_out).abs().max() < TOL and (lse - ref_lse).abs().max() < TOL
