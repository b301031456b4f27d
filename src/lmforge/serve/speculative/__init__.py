"""Speculative decoding inside the serving engine.

Each step, a sequence that speculates gets up to k draft tokens from a proposer (prompt lookup,
a small draft model, or Medusa heads on the target's own hidden state); the target model runs its last real token plus the draft in one forward
over the paged cache and gets logits at every one of those positions; `verify` keeps the longest
acceptable prefix of the draft plus one token of the target's own, so a step yields 1..k+1 tokens.
Greedy requests accept a draft token iff it is the target's argmax (output identical to plain
decoding); sampled requests use rejection sampling, which keeps the target distribution exactly.
K/V written for rejected draft tokens sit past the sequence's computed length: they are
overwritten by the next step, and whole blocks past the end are returned to the allocator.
With `adaptive` on, each sequence's draft length follows its recent acceptance (adaptive.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError
from lmforge.serve.speculative.adaptive import DraftBudget

__all__ = ["METHODS", "DraftBudget", "SpecState", "SpeculativeConfig", "make_proposer"]

METHODS = ("ngram", "draft", "medusa")


@dataclass
class SpeculativeConfig:
    method: str = "ngram"               # "ngram" (prompt lookup), "draft" (a small model) or "medusa" (heads)
    num_tokens: int = 4                 # draft tokens proposed per step (k)
    ngram_max: int = 3                  # prompt lookup matches the last n tokens, n = ngram_max..ngram_min
    ngram_min: int = 1
    draft_model: object = None          # method "draft": a Transformer over the target's vocabulary
    default_on: bool = True             # requests speculate unless they opt out
    medusa_heads: object = None         # method "medusa": MedusaHeads trained for the target (medusa.py)
    adaptive: bool = True               # per-sequence draft length from recent acceptance (adaptive.py)

    def validate(self, vocab_size: int) -> None:
        if self.method not in METHODS:
            raise LmforgeError(f"speculative method must be one of {', '.join(METHODS)} (got {self.method!r})")
        if self.num_tokens < 1:
            raise LmforgeError(f"speculative num_tokens must be >= 1 (got {self.num_tokens})")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise LmforgeError("prompt lookup needs 1 <= ngram_min <= ngram_max")
        if self.method == "draft":
            if self.draft_model is None:
                raise LmforgeError("speculative method 'draft' needs a draft model")
            if self.draft_model.cfg.vocab_size != vocab_size:
                raise LmforgeError(f"the draft model's vocabulary ({self.draft_model.cfg.vocab_size}) differs "
                                   f"from the target's ({vocab_size}); they must share a tokenizer")
        if self.method == "medusa":
            heads = self.medusa_heads
            if heads is None:
                raise LmforgeError("speculative method 'medusa' needs trained heads (lmforge medusa-train)")
            if heads.vocab_size != vocab_size:
                raise LmforgeError(f"the medusa heads were trained for a vocabulary of {heads.vocab_size}, "
                                   f"not {vocab_size}")


@dataclass
class SpecState:
    """Per-sequence speculation state (Sequence.spec)."""
    draft: list[int] = field(default_factory=list)          # this step's draft tokens
    draft_probs: torch.Tensor | None = None                 # [len(draft), V] proposal; None = point masses
    draft_computed: int = 0                                 # positions held in the draft model's cache
    want: int = 0                                           # draft slots to reserve this step
    budget: DraftBudget | None = None                       # adaptive draft length (None: always k)
    guesses: list[int] = field(default_factory=list)        # medusa: the heads' guesses after the newest token

    def reset(self) -> None:
        self.draft, self.draft_probs, self.want = [], None, 0


def make_proposer(config: SpeculativeConfig, num_blocks: int, block_size: int, device):
    from lmforge.serve.speculative.draft_model import DraftModelProposer
    from lmforge.serve.speculative.medusa import MedusaProposer
    from lmforge.serve.speculative.ngram import NgramProposer
    if config.method == "ngram":
        return NgramProposer(config.ngram_max, config.ngram_min)
    if config.method == "medusa":
        return MedusaProposer()
    return DraftModelProposer(config.draft_model, num_blocks, block_size, device)
