"""DPO's held-out win-rate: the policy's greedy completions against the starting model's, judged by
closeness to the chosen completion. Checked against a plain full-logits greedy loop and difflib."""
import contextlib
import copy
import difflib
import random

import torch

from lmforge.align.dpo import DPOConfig, DPOObjective
from lmforge.align.lora import apply_lora, lora_layers
from lmforge.align.preference_data import build_pair_examples

from tests.align.helpers import tiny
from tests.align.test_dpo import key_value_pairs, kv_tokenizer

TOKENS = 6


def greedy(model, tok, prompt: list[int]) -> str:
    """Reference: argmax of the full logits, one token at a time, no cache, stopping at a stop token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(TOKENS):
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
            if t in tok.stop_ids():
                break
            ids.append(t)
            out.append(t)
    return tok.decode(out)


def reference_win_rate(policy, start, tok, examples, references: list[str]) -> float:
    score = 0.0
    for e, ref in zip(examples, references):
        a = difflib.SequenceMatcher(None, greedy(policy, tok, e.prompt), ref, autojunk=False).ratio()
        b = difflib.SequenceMatcher(None, greedy(start, tok, e.prompt), ref, autojunk=False).ratio()
        score += 1.0 if a > b else 0.0 if a < b else 0.5
    return score / len(examples)


def test_win_rate_is_the_policy_against_the_start_judged_by_the_chosen_completion():
    tok = kv_tokenizer()
    start, policy = tiny(tok, seed=0), tiny(tok, seed=3)
    pairs = key_value_pairs(random.Random(5), 16)
    examples, _ = build_pair_examples(tok, pairs, 64, 16)
    assert len(examples) == 16
    cfg = DPOConfig(loss_type="simpo", win_rate_prompts=16, win_rate_tokens=TOKENS)
    obj = DPOObjective(tok, examples, examples, cfg, 4, tok.eos_id)
    obj.start_completions(start, contextlib.nullcontext)
    got = obj.evaluate(policy, contextlib.nullcontext)["val_win_rate"]
    expected = reference_win_rate(policy, start, tok, examples, [p.chosen for p in pairs])
    # the fixture tells the mistakes apart: judged by the rejected completion, or the policy against
    # itself (every prompt a tie), the rate would differ
    flipped = reference_win_rate(policy, start, tok, examples, [p.rejected for p in pairs])
    assert expected != 0.5 and flipped != expected
    assert got == expected
    assert obj.evaluate(start, contextlib.nullcontext)["val_win_rate"] == 0.5  # the start against itself


def test_with_lora_the_start_is_the_base_with_the_adapters_off():
    tok = kv_tokenizer()
    base = tiny(tok, seed=0)
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    torch.manual_seed(5)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.5)
    pairs = key_value_pairs(random.Random(6), 12)
    examples, _ = build_pair_examples(tok, pairs, 64, 12)
    obj = DPOObjective(tok, examples, examples, DPOConfig(loss_type="simpo", win_rate_tokens=TOKENS), 4, tok.eos_id)
    got = obj.evaluate(model, contextlib.nullcontext)["val_win_rate"]
    assert obj.start_texts == [greedy(base, tok, e.prompt) for e in examples]
    assert got == reference_win_rate(model, base, tok, examples, [p.chosen for p in pairs])
