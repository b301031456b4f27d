"""Win-rate of a finetuned policy against its starting model on held-out preference prompts.

Both models complete each prompt greedily through the serving engine (`greedy_rollouts`), and a
judge decides which completion is better. The judge is reference-based and deterministic: the
completion whose text is closer to the pair's held-out *chosen* completion (difflib's similarity
ratio, 2 * matching characters / total characters) wins; equal closeness is a tie and counts one
half. So 0.5 means "no better than where it started", 1.0 "closer to the preferred answer on every
prompt". It judges what the policy writes, not how it ranks the given pair (that is the implicit-
reward accuracy), and it needs no reward model.
"""
from __future__ import annotations

import difflib

from lmforge.align.rollouts import greedy_rollouts


def closeness(text: str, reference: str) -> float:
    return difflib.SequenceMatcher(None, text, reference, autojunk=False).ratio()


def judge(policy_text: str, start_text: str, chosen: str) -> float:
    """1 when the policy's completion is closer to `chosen` than the start's, 0 when farther, 0.5 on a tie."""
    a, b = closeness(policy_text, chosen), closeness(start_text, chosen)
    return 1.0 if a > b else 0.0 if a < b else 0.5


def win_rate(policy_texts: list[str], start_texts: list[str], chosen: list[str]) -> float:
    if not (len(policy_texts) == len(start_texts) == len(chosen)) or not chosen:
        raise ValueError("win_rate needs as many policy and start completions as chosen references (and one at least)")
    return sum(judge(p, s, c) for p, s, c in zip(policy_texts, start_texts, chosen)) / len(chosen)


def greedy_texts(model, tok, prompts: list[list[int]], max_tokens: int, pad_id: int, autocast) -> list[str]:
    """The greedy completion of each prompt (token ids) as text, without its stop token."""
    batch = greedy_rollouts(model, tok, prompts, [], max_tokens=max_tokens, pad_id=pad_id, reward_fn=None,
                            autocast=autocast)
    stops = tok.stop_ids()
    return [tok.decode([t for t, m in zip(row.tolist(), mask.tolist()) if m and t not in stops])
            for row, mask in zip(batch.completion_ids, batch.completion_mask)]


def chosen_texts(tok, examples) -> list[str]:
    """The chosen completions of PairExamples as text, without stop tokens."""
    stops = tok.stop_ids()
    return [tok.decode([t for t in e.chosen if t not in stops]) for e in examples]
