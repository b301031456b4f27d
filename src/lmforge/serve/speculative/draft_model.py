"""A small draft model with the target's tokenizer proposes k tokens autoregressively.

Its K/V live in a paged cache of their own with the same geometry as the target's, addressed
through the sequence's own block table: no second allocator, and rollback is the target's.
`SpecState.draft_computed` counts the positions the draft cache holds for this sequence; each
step first catches up (the prompt the first time, afterwards the tokens accepted last step),
then feeds its own proposals one at a time, all sequences batched together."""
from __future__ import annotations

import torch

from lmforge.serve.paged_cache import PagedKVCache, StepBatch, StepItem
from lmforge.serve.sequence import Sequence
from lmforge.serve.speculative.verify import sampling_probs


class DraftModelProposer:
    def __init__(self, model, num_blocks: int, block_size: int, device):
        self.model = model
        dtype = model.embed_tokens.weight.dtype
        self.cache = PagedKVCache(model.cfg, num_blocks, block_size, device, dtype)
        self.device = device

    def plan(self, seq: Sequence, k: int) -> int:
        return k

    @torch.inference_mode()
    def propose(self, work: list[tuple[Sequence, int]], default_generator=None) -> None:
        """work: (sequence, k) pairs -> seq.spec.draft (k tokens) and, for sampled requests,
        seq.spec.draft_probs (the draft's distribution at each of them)."""
        want = {}
        items = []
        for seq, k in work:
            spec = seq.spec
            spec.draft, rows = [], []
            spec.draft_probs = rows
            want[id(seq)] = k
            # Every position before the last token holds the prompt, earlier output or accepted
            # draft tokens; the draft's K/V past that point belong to rejected tokens (the first
            # rejected one sits where the target's correction now is), so they are recomputed.
            start = min(spec.draft_computed, seq.num_tokens - 1)
            items.append(StepItem(seq, start, seq.token_ids[start:], 1))
        while items:
            step = StepBatch(self.cache, items, self.device)
            logits = self.model(step.tokens, step.positions, cache=step, logits_index=step.logits_index)[0].float()
            ends = {id(it.seq): it.start + len(it.tokens) for it in step.items}
            items = []
            for seq, row in zip(step.sampled, logits):
                spec = seq.spec
                spec.draft_computed = ends[id(seq)]
                probs = sampling_probs(row[None], seq.params)
                if probs is None:
                    token = int(row.argmax())
                else:
                    token = int(torch.multinomial(probs[0], 1, generator=seq.generator or default_generator))
                    spec.draft_probs.append(probs[0])
                spec.draft.append(token)
                if len(spec.draft) < want[id(seq)]:
                    items.append(StepItem(seq, seq.num_tokens + len(spec.draft) - 1, [token], 1))
        for seq, _ in work:
            rows = seq.spec.draft_probs
            seq.spec.draft_probs = torch.stack(rows) if rows else None
