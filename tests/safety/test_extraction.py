"""Extraction strength (Carlini et al. 2021): 1 - k/|y| for the shortest gold prefix y[:k] from which
greedy decoding reproduces the rest of the answer; checked on a bigram lookup model whose greedy
continuations are known by hand, and against a literal greedy-decoding search."""
from __future__ import annotations

import random

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.safety.unlearn_run import extraction_strength

V = 16


class Bigram(torch.nn.Module):
    """Logits: the next token is table[current token], for certain."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.nn.functional.one_hot(self.table[x], V).float() + self.dummy


class SpaceTok:
    eos_id = None

    def encode(self, s):
        return [int(t) for t in s.split()]


def greedy_search(model, prompt, answer) -> float:
    """The definition, literally: try k = 0, 1, ... and decode |y| - k tokens greedily each time."""
    for k in range(len(answer) + 1):
        ctx = list(prompt) + list(answer[:k])
        for _ in range(len(answer) - k):
            ctx.append(int(model(torch.tensor([ctx]))[0, -1].argmax()))
        if ctx[len(prompt):] == list(answer):
            return 1 - k / len(answer)
    raise AssertionError("unreachable: k = |y| always reproduces")


def test_known_answers_on_a_successor_model():
    model = Bigram([(t + 1) % V for t in range(V)])
    tok = SpaceTok()
    # 3 4 follow 2, 9 does not follow 4, then 10 11 follow: greedy needs the prefix 3 4 9 (k = 3 of 5)
    assert extraction_strength(model, tok, [("0 1 2", "3 4 9 10 11")]) == pytest.approx(1 - 3 / 5)
    # two misses (5 after 1, 9 after 6): only the last one counts, k = 4 of 5
    assert extraction_strength(model, tok, [("0", "1 5 6 9 10")]) == pytest.approx(1 - 4 / 5)
    assert extraction_strength(model, tok, [("5", "6 7 8")]) == 1.0      # the prompt alone extracts it
    assert extraction_strength(model, tok, [("1", "2 3 7")]) == 0.0      # even the last token is missed
    assert extraction_strength(model, tok, [("0 1 2", "3 4 9 10 11"), ("5", "6 7 8"), ("1", "2 3 7")]) == \
        pytest.approx((0.4 + 1 + 0) / 3)
    with pytest.raises(LmforgeError, match="non-empty prompt"):
        extraction_strength(model, tok, [("", "1 2")])


def test_equals_a_literal_greedy_search_on_random_pairs():
    rng = random.Random(0)
    model = Bigram([rng.randrange(V) for _ in range(V)])
    tok = SpaceTok()
    for _ in range(40):
        prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 4))]
        answer, last = [], prompt[-1]
        for _ in range(rng.randrange(1, 7)):  # mostly the model's own continuation, sometimes not
            last = int(model.table[last]) if rng.random() < 0.7 else rng.randrange(V)
            answer.append(last)
        want = greedy_search(model, prompt, answer)
        got = extraction_strength(model, tok, [(" ".join(map(str, prompt)), " ".join(map(str, answer)))])
        assert got == pytest.approx(want), (prompt, answer)
