"""Invariances of the SFT, DPO and GRPO losses and gradients, through the training loop's
accumulation (`accumulate_gradients`, the loop's own token weighting):

- batch 1 x accumulation 8 == batch 8 x accumulation 1,
- packed == unpacked (documents side by side in one row, attention kept inside each),
- left padding == right padding (an attention mask numbering each row's real tokens from 0),

each equal to a reference computed row by row from a plain full forward (log_softmax over the
whole vocabulary, no padding, no packing) and the loss's closed form.

Tolerances (fp64 models): losses to 1e-12 relative, gradients to 1e-10 of each tensor's norm
(measured <= 3e-15 for both: only summation order differs between layouts).
"""
import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from lmforge.align.data import stdlib_chats
from lmforge.align.dpo import DPOConfig, DPOObjective, reference_logps
from lmforge.align.grpo import (
    GRPOConfig,
    GRPOObjective,
    RolloutLoader,
    split_micro_batches,
)
from lmforge.align.preference import dpo_loss
from lmforge.align.preference_data import PairExample, collate_pairs
from lmforge.align.rl import group_advantages, grpo_loss, mask_truncated
from lmforge.align.sft import SFTObjective, build_examples, collate_packed
from lmforge.train.examples import collate
from lmforge.align.tasks import arithmetic_tasks
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_tokenizer
from lmforge.train.trainer import accumulate_gradients

LOSS_RTOL, GRAD_RTOL = 1e-12, 1e-10
CPU = torch.device("cpu")


def tiny(vocab: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                   max_seq_len=320)).double()


def step(objective, net, micros):
    """The loop's accumulation of one optimizer step -> (its mean loss, the accumulated gradients)."""
    net.zero_grad()
    loss_sum, _, _, _ = accumulate_gradients(objective, net, net, micros, CPU, contextlib.nullcontext)
    return float(loss_sum) / len(micros), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def reference_grads(net, loss):
    net.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def assert_same(got, want, what):
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL, abs=0), what
    assert grads.keys() == ref_grads.keys(), what
    for name, ref in ref_grads.items():
        assert float((grads[name] - ref).norm() / ref.norm()) < GRAD_RTOL, (what, name)


def full_logprobs(net, ids: list[int]) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) for one sequence alone, from the full logits."""
    x = torch.tensor([ids])
    return F.log_softmax(net(x[:, :-1]), dim=-1)[0].gather(1, x[0, 1:, None])[:, 0]


def left_pad(tokens, other, pad_id, fill, lengths):
    """Right-padded [B, T] tokens and a per-position tensor (labels/targets) moved to the left."""
    tl, ol = torch.full_like(tokens, pad_id), torch.full_like(other, fill)
    for r, n in enumerate(lengths):
        tl[r, tokens.shape[1] - n:] = tokens[r, :n]
        ol[r, tokens.shape[1] - n:] = other[r, :n]
    mask = (torch.arange(tokens.shape[1])[None] >= tokens.shape[1] - torch.tensor(lengths)[:, None]).long()
    return tl, ol, mask


# --- SFT ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_setup():
    chats = list(itertools.islice(stdlib_chats("train"), 60))
    tok = train_tokenizer([m["content"] for c in chats for m in c], vocab_size=500, min_frequency=1)
    examples, _ = build_examples(tok, chats, 129, 8)
    assert len({sum(t) for _, t in examples}) >= 3  # different numbers of trained tokens per chat
    return tok, examples, tiny(tok.vocab_size)


def test_sft_accumulation_packing_and_padding_are_invariant(sft_setup):
    tok, examples, net = sft_setup
    objective = SFTObjective(tok, examples, [], 8)
    pad = objective.pad_id
    # reference: each chat alone, cross-entropy over its trained tokens, mean over all of them
    nll, total = torch.zeros((), dtype=torch.float64), 0
    for ids, trained in examples:
        lp = full_logprobs(net, ids)
        keep = torch.tensor(trained[1:])
        nll, total = nll - lp[keep].sum(), total + int(keep.sum())
    ref = (float(nll.detach() / total), reference_grads(net, nll / total))

    packed = collate_packed(examples, pad, 256)
    assert packed["tokens"].shape[0] < len(examples)  # several chats share a row
    right = collate(examples, pad)
    lengths = [len(ids) - 1 for ids, _ in examples]
    tokens, labels, mask = left_pad(right["tokens"], right["labels"], pad, -100, lengths)
    left = {"tokens": tokens, "labels": labels, "attention_mask": mask}
    layouts = {
        "batch 8 x accum 1": [right],
        "batch 1 x accum 8": [collate([e], pad) for e in examples],
        "packed, batch 8 x accum 1": [packed],
        "packed, batch 4 x accum 2": [collate_packed(examples[:4], pad, 256), collate_packed(examples[4:], pad, 256)],
        "left-padded, batch 8 x accum 1": [left],
    }
    for what, micros in layouts.items():
        assert_same(step(objective, net, micros), ref, what)


# --- DPO ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dpo_setup():
    g = torch.Generator().manual_seed(0)
    vocab = 60

    def ids(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    pairs = [PairExample(ids(2, 12), ids(1, 9), ids(1, 9)) for _ in range(8)]
    net, start = tiny(vocab, 0), tiny(vocab, 1)
    cache = reference_logps(start, pairs, pad_id=0)  # the reference: another model's log-probs, cached
    return pairs, net, cache


def dpo_reference(net, pairs, cache, beta):
    """-mean log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), each log-prob summed over the
    completion of the sequence alone."""
    def logp(prompt, completion):
        return full_logprobs(net, prompt + completion)[len(prompt) - 1:].sum()
    chosen = torch.stack([logp(p.prompt, p.chosen) for p in pairs])
    rejected = torch.stack([logp(p.prompt, p.rejected) for p in pairs])
    loss = -F.logsigmoid(beta * ((chosen - cache[:, 0]) - (rejected - cache[:, 1]))).mean()
    return float(loss.detach()), reference_grads(net, loss)


def test_dpo_accumulation_and_padding_are_invariant(dpo_setup):
    pairs, net, cache = dpo_setup
    objective = DPOObjective(None, pairs, [], DPOConfig(beta=0.5), 8, 0, ref_train=cache, vocab_size=60)

    def batch(index):
        b = collate_pairs([pairs[i] for i in index], 0)
        b["index"] = torch.tensor(index)
        return b
    ref = dpo_reference(net, pairs, cache, 0.5)
    right = batch(list(range(8)))
    lengths = [int(n) - 1 for n in right["lengths"]]
    tokens, targets, mask = left_pad(right["tokens"], right["targets"], 0, -100, lengths)
    left = {**right, "tokens": tokens, "targets": targets, "attention_mask": mask}
    layouts = {"batch 8 x accum 1": [right], "batch 1 x accum 8": [batch([i]) for i in range(8)],
               "batch 2 x accum 4": [batch([i, i + 1]) for i in range(0, 8, 2)],
               "left-padded, batch 8 x accum 1": [left]}
    for what, micros in layouts.items():
        assert_same(step(objective, net, micros), ref, what)


def test_dpo_loss_on_packed_sequences_equals_the_reference(dpo_setup):
    """The DPO objective batches pairs padded (it has no packing); the model's packed path gives
    the same completion log-probs, so a packed DPO batch gives the same loss and gradients."""
    pairs, net, cache = dpo_setup
    seqs = [(p.prompt + p.chosen, len(p.prompt)) for p in pairs] + [(p.prompt + p.rejected, len(p.prompt))
                                                                     for p in pairs]
    rows = [seqs[i:i + 4] for i in range(0, len(seqs), 4)]  # 4 sequences side by side per row
    width = max(sum(len(s) - 1 for s, _ in row) for row in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), -100)
    doc_ids = torch.full((len(rows), width), -1)
    spans = []
    for r, row in enumerate(rows):
        pos = 0
        for d, (s, n_prompt) in enumerate(row):
            n = len(s) - 1
            tokens[r, pos:pos + n] = torch.tensor(s[:-1])
            targets[r, pos + n_prompt - 1:pos + n] = torch.tensor(s[n_prompt:])
            doc_ids[r, pos:pos + n] = d
            spans.append((r, pos, pos + n))
            pos += n
    net.zero_grad()
    lp = net.token_logprobs(tokens, targets, doc_ids=doc_ids)
    summed = torch.stack([lp[r, a:b].sum() for r, a, b in spans])
    out = dpo_loss(summed[:8], summed[8:], cache[:, 0].double(), cache[:, 1].double(), beta=0.5)
    got = (float(out.loss.detach()), reference_grads(net, out.loss))
    assert_same(got, dpo_reference(net, pairs, cache, 0.5), "packed")


# --- GRPO ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grpo_tok():
    texts = [f"{t.prompt} {t.answer}" for t in arithmetic_tasks(300, 0)]
    return train_tokenizer(texts, vocab_size=300, min_frequency=1)


def grpo_objective(tok, net, aggregation, scale, beta):
    cfg = GRPOConfig(group_size=4, max_tokens=5, temperature=1.0, scale=scale, aggregation=aggregation, beta=beta,
                     mask_truncated=True, chat=False)
    ref_net = tiny(tok.vocab_size, 7)
    obj = GRPOObjective(tok, arithmetic_tasks(40, 0), [], cfg, 1, tok.eos_id,
                        reward_fn=lambda text, task: float(len(text) % 3), reference=lambda device: ref_net)
    obj.prepare_model(net)
    return obj, ref_net


def grpo_reference(net, ref_net, step, cfg):
    """grpo_loss over the whole step with log-probs of each row alone from a full forward, and
    advantages over the whole step's groups."""
    rows, refs = [], []
    width = step["completion_mask"].shape[1]
    for i in range(step["tokens"].shape[0]):
        p, n = int(step["prompt_lens"][i]), int(step["completion_mask"][i].sum())
        ids = step["tokens"][i, :p + n].tolist()
        rows.append(F.pad(full_logprobs(net, ids)[p - 1:], (0, width - n)))
        with torch.no_grad():
            refs.append(F.pad(full_logprobs(ref_net, ids)[p - 1:], (0, width - n)))
    mask = step["completion_mask"].double()
    adv = group_advantages(step["rewards"].double(), cfg.group_size, scale=cfg.scale).advantages
    out = grpo_loss(torch.stack(rows), step["old_logprobs"].double(), adv, mask_truncated(mask, step["truncated"]),
                    ref_logprobs=torch.stack(refs), beta=cfg.beta, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                    aggregation=cfg.aggregation, max_len=cfg.max_tokens)
    return float(out.loss.detach()), reference_grads(net, out.loss)


def perturbed_old(step, seed=0):
    """Old log-probs moved off the current ones, so ratios leave 1 and both clips engage."""
    g = torch.Generator().manual_seed(seed)
    m = step["completion_mask"]
    return {**step, "old_logprobs": step["old_logprobs"] + 0.3 * torch.randn(m.shape, generator=g) * m}


@pytest.mark.parametrize("aggregation,scale,beta", [("grpo", "group", 0.05), ("dr_grpo", "none", 0.0),
                                                    ("dapo", "batch", 0.1)])
def test_grpo_accumulation_packing_and_padding_are_invariant(grpo_tok, aggregation, scale, beta):
    tok = grpo_tok
    net = tiny(tok.vocab_size, 3)
    obj, ref_net = grpo_objective(tok, net, aggregation, scale, beta)
    # the loader samples a whole step at once: 1 prompt x 8 micro-batches draws the rollouts of 8 x 1
    one = RolloutLoader(obj, 8, 3, 1).next_batch()  # seed 3: rows both cut and ended at two lengths
    eight = RolloutLoader(obj, 1, 3, 8)
    micros = [eight.next_batch() for _ in range(8)]
    assert sum(int(m["tokens"].shape[0]) for m in micros) == one["tokens"].shape[0] == 32
    for i, m in enumerate(micros):
        n = m["completion_mask"].shape[1]
        assert torch.equal(m["completion_ids"], one["completion_ids"][4 * i:4 * i + 4, :n])
    trained = mask_truncated(one["completion_mask"], one["truncated"]).sum(1)
    assert 0 < int((trained == 0).sum()) and len(set(trained.tolist())) > 2  # masked rows and varied lengths
    assert len(set(one["rewards"].tolist())) > 1
    one = perturbed_old(one)
    ref = grpo_reference(net, ref_net, one, obj.cfg)
    layouts = {"batch 8 x accum 1": [one], "batch 1 x accum 8": split_micro_batches(one, 8),
               "batch 2 x accum 4": split_micro_batches(one, 4)}
    for what, ms in layouts.items():
        assert_same(step(obj, net, ms), ref, what)

    # the same step with the completions' log-probs from a left-padded and from a packed layout
    n_rows, width = one["tokens"].shape[0], one["completion_mask"].shape[1]
    lens = (one["prompt_lens"] + one["completion_mask"].sum(1)).long().tolist()
    targets = torch.full((n_rows, one["tokens"].shape[1] - 1), -100)
    for i, n in enumerate(lens):
        p = int(one["prompt_lens"][i])
        targets[i, p - 1:n - 1] = one["tokens"][i, p:n]
    tokens, tgt, mask = left_pad(one["tokens"][:, :-1], targets, tok.eos_id, -100, [n - 1 for n in lens])
    cols = [list(range(tokens.shape[1] - (n - 1) + int(one["prompt_lens"][i]) - 1, tokens.shape[1]))
            for i, n in enumerate(lens)]

    def loss_from(lp_rows):
        lp = torch.stack([F.pad(r, (0, width - r.numel())) for r in lp_rows])
        adv = group_advantages(one["rewards"].double(), 4, scale=scale).advantages
        with torch.no_grad():
            ref_lp = torch.stack([F.pad(full_logprobs(ref_net, one["tokens"][i, :n].tolist())
                                        [int(one["prompt_lens"][i]) - 1:], (0, width - (n - int(one["prompt_lens"][i]))))
                                  for i, n in enumerate(lens)])
        out = grpo_loss(lp, one["old_logprobs"].double(), adv,
                        mask_truncated(one["completion_mask"].double(), one["truncated"]), ref_logprobs=ref_lp,
                        beta=beta, eps_low=0.2, eps_high=0.28, aggregation=aggregation, max_len=5)
        return float(out.loss.detach()), reference_grads(net, out.loss)

    net.zero_grad()
    lp = net.token_logprobs(tokens, tgt, attention_mask=mask)
    assert_same(loss_from([lp[i, c] for i, c in enumerate(cols)]), ref, "left-padded")

    per_row = 4  # rows of 4 rollouts side by side
    packed_rows, spans = [], []
    for r0 in range(0, n_rows, per_row):
        toks, tg, docs = [], [], []
        for d, i in enumerate(range(r0, r0 + per_row)):
            n, p = lens[i], int(one["prompt_lens"][i])
            spans.append((r0 // per_row, len(toks) + p - 1, len(toks) + n - 1))
            toks += one["tokens"][i, :n - 1].tolist()
            tg += targets[i, :n - 1].tolist()
            docs += [d] * (n - 1)
        packed_rows.append((toks, tg, docs))
    w = max(len(t) for t, _, _ in packed_rows)
    P = torch.tensor([t + [0] * (w - len(t)) for t, _, _ in packed_rows])
    T = torch.tensor([t + [-100] * (w - len(t)) for _, t, _ in packed_rows])
    D = torch.tensor([d + [-1] * (w - len(d)) for _, _, d in packed_rows])
    net.zero_grad()
    lp = net.token_logprobs(P, T, doc_ids=D)
    assert_same(loss_from([lp[r, a:b] for r, a, b in spans]), ref, "packed")
