"""Prompt lookup decoding: draft the tokens that followed an earlier occurrence of the last n tokens.

Free to compute and strong whenever the output copies its context (code edits, quoting,
summaries); it proposes nothing when the tail of the sequence never occurred before."""
from __future__ import annotations

from lmforge.serve.sequence import Sequence


def prompt_lookup(tokens: list[int], k: int, n_max: int, n_min: int = 1) -> list[int]:
    """k tokens following the most recent earlier occurrence of the last n tokens, trying the
    longest n first; [] when there is none."""
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        tail = tokens[size - n:]
        first = tail[0]
        # Scan candidate starts right to left; only positions holding the tail's first token can match.
        for start in range(size - n - 1, -1, -1):
            if tokens[start] == first and tokens[start:start + n] == tail:
                return _copy(tokens, start + n, k)
    return []


def _copy(tokens: list[int], source: int, k: int) -> list[int]:
    """k tokens copied from `source` on; a copy that runs into the end continues from its own
    first tokens (as in LZ77), so a repeating pattern of period < k still drafts k tokens."""
    out = []
    for j in range(k):
        i = source + j
        out.append(tokens[i] if i < len(tokens) else out[i - len(tokens)])
    return out


class NgramProposer:
    def __init__(self, n_max: int, n_min: int = 1):
        self.n_max, self.n_min = n_max, n_min

    def plan(self, seq: Sequence, k: int) -> int:
        """Find the draft now (it is cheap) so the scheduler reserves only what it needs."""
        seq.spec.draft = prompt_lookup(seq.token_ids, k, self.n_max, self.n_min)
        seq.spec.draft_probs = None
        return len(seq.spec.draft)

    def propose(self, work, default_generator=None) -> None:
        """The drafts were found in plan(); the engine has already cut them to the scheduled size."""
