"""Continuous batching: every step, decide which sequences advance by how many tokens.

Each step has a token budget. Running sequences go first, oldest first: a decoding sequence needs
one token, a sequence still in its prompt gets the next chunk of it (chunked prefill). What is
left of the budget admits waiting requests, first come first served. So a step mixes decode and
prefill, decodes are never starved by a long prompt, and a long prompt is split across steps.

When the cache runs out of blocks, the newest running sequence is preempted: its blocks are freed
and it goes back to the front of the queue, to be recomputed later (prefix caching makes that
cheap). Its sampled tokens are kept, so its output is unchanged.

A speculating sequence asks for 1 + its draft length (its last token and the draft tokens, all
verified in the same forward); a tight budget shortens the draft, never the real token.
"""
from __future__ import annotations

from collections import deque

from lmforge.serve.block_manager import BlockManager
from lmforge.serve.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 64, max_batched_tokens: int = 512):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    @staticmethod
    def _draft_slots(seq: Sequence) -> int:
        """Speculative draft tokens to verify along with a decoding sequence's last token."""
        return seq.spec.want if seq.spec is not None and seq.num_pending == 1 else 0

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The (sequence, number of new tokens) pairs to run this step."""
        budget = self.max_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_pending + self._draft_slots(seq), budget)
            while not self.blocks.ensure_slots(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.allocate_prefix(seq)
            n = min(seq.num_pending, budget)
            if not self.blocks.ensure_slots(seq, n):
                self.blocks.free_sequence(seq)  # waiting sequences hold no blocks
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = Status.FINISHED
