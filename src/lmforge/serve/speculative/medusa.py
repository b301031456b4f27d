"""Medusa heads (Cai et al. 2024): extra heads on the target's last hidden state that guess the
tokens after the next one, so the target drafts for itself without a second model.

The target's hidden state h_t (after the final norm) gives token t+1 through its LM head; head i
(i = 1..K) turns h_t into a feature h_t + SiLU(W_i h_t + b_i) that the same, frozen LM head reads
as a guess for token t+1+i. W_i starts at zero, so an untrained head repeats the base head's
guess. In the engine every step runs the heads on each logit row's hidden state, in the same
LM-head pass as the logits (`ModelRunner`); the guesses of the row that produced a sequence's
newest token are its draft for the tokens after that one, and the target verifies the draft like
any other (greedy: argmax matching; sampled: the draft is a point mass, so rejection sampling keeps
the target's distribution exactly).

Heads are saved as a folder: `medusa.safetensors` (W [K, dim, dim], b [K, dim]) and
`medusa.json` (K, dim, vocabulary size and how they were trained); `load_heads` checks that they
fit the target they are loaded for.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError

WEIGHTS, CONFIG = "medusa.safetensors", "medusa.json"


class MedusaHeads(nn.Module):
    def __init__(self, dim: int, num_heads: int, vocab_size: int):
        super().__init__()
        if num_heads < 1:
            raise LmforgeError(f"medusa needs at least one head (got {num_heads})")
        self.dim, self.num_heads, self.vocab_size = dim, num_heads, vocab_size
        self.weight = nn.Parameter(torch.zeros(num_heads, dim, dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, dim] -> features [N, K, dim] for the target's LM head."""
        h = hidden.to(self.weight.dtype)
        return h[:, None] + F.silu(torch.einsum("nd,ked->nke", h, self.weight) + self.bias)

    def first(self, k: int) -> MedusaHeads:
        """The first k heads (drafts of k tokens never read the others, so the engine does not run them)."""
        if k >= self.num_heads:
            return self
        heads = MedusaHeads(self.dim, k, self.vocab_size).to(self.weight)
        heads.load_state_dict({"weight": self.weight[:k], "bias": self.bias[:k]})
        return heads.eval()


def save_heads(heads: MedusaHeads, path: str | Path, info: dict, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    from lmforge.outputs import atomic_write_json, commit_output_dir, new_output_dir
    tmp = new_output_dir(path, "medusa-heads", overwrite)
    save_file({"weight": heads.weight.detach().float().contiguous(), "bias": heads.bias.detach().float().contiguous()},
              str(tmp / WEIGHTS))
    atomic_write_json(tmp / CONFIG, {"num_heads": heads.num_heads, "dim": heads.dim,
                                     "vocab_size": heads.vocab_size, **info})
    return commit_output_dir(tmp, path, "medusa-heads")


def load_heads(path: str | Path, target=None) -> MedusaHeads:
    """Heads saved by `save_heads` (`lmforge medusa-train`); with target, checked to fit it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise LmforgeError(f"{path} holds no medusa heads (expected {CONFIG} and {WEIGHTS}; "
                           "train them with `lmforge medusa-train`)")
    try:
        meta = json.loads((path / CONFIG).read_text())
        heads = MedusaHeads(int(meta["dim"]), int(meta["num_heads"]), int(meta["vocab_size"]))
        state = load_file(str(path / WEIGHTS))
        heads.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise LmforgeError(f"{path}: unreadable medusa heads ({e})") from None
    if target is not None:
        if (target.cfg.dim, target.cfg.vocab_size) != (heads.dim, heads.vocab_size):
            raise LmforgeError(f"{path}: these heads were trained for a model with dim {heads.dim} and vocabulary "
                               f"{heads.vocab_size}, not dim {target.cfg.dim} / vocabulary {target.cfg.vocab_size}")
        param = target.embed_tokens.weight
        heads.to(device=param.device, dtype=param.dtype)
    return heads.eval()


class MedusaProposer:
    """Drafts are the guesses the model runner computed with the step that produced the sequence's
    newest token (the heads run inside that step, on the same LM-head pass as its logits)."""

    def plan(self, seq, k: int) -> int:
        seq.spec.draft = list(seq.spec.guesses[:k])
        seq.spec.draft_probs = None
        return len(seq.spec.draft)

    def propose(self, work, default_generator=None) -> None:
        """The drafts were set in plan(); the engine has already cut them to the scheduled size."""

    def observe(self, seqs: list, guesses: list[list[int]]) -> None:
        """guesses: each sequence's K guesses from the row behind its newest token."""
        for seq, row in zip(seqs, guesses):
            seq.spec.guesses = row
