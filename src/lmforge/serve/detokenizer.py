"""Streaming text from token ids: incremental decoding and stop strings.

Byte-level BPE tokens can end in the middle of a UTF-8 character, so text is decoded over a small
window of recent tokens and only released once it no longer ends in U+FFFD. Text that could be
the beginning of a stop string is held back until it is known not to be one.
"""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.prefix_offset = 0   # ids[prefix_offset:read_offset] were decoded last time
        self.read_offset = 0
        self.text = ""           # all decoded text (cut at the stop string once one is found)
        self.emitted = 0         # how much of self.text has been handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=True)

    def push(self, token_id: int) -> None:
        """Append one generated token (not the final stop token) to the text."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            old_len = len(self.text)
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> None:
        if not self.stop:
            return
        longest = max(len(s) for s in self.stop)
        search_from = max(0, old_len - longest + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest end of the text that is a proper prefix of a stop string."""
        for n in range(min(max((len(s) for s in self.stop), default=0) - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def take(self, final: bool = False) -> str:
        """The text not handed out yet that is safe to show (all of it once `final`)."""
        if final and not self.stopped and self.read_offset < len(self.ids):
            # The generation ended inside a multi-byte character: flush it as U+FFFD, as decode() would.
            pending = self._decode(self.ids[self.prefix_offset:])
            done = self._decode(self.ids[self.prefix_offset:self.read_offset])
            old_len = len(self.text)
            self.text += pending[len(done):]
            self.read_offset = len(self.ids)
            self._check_stop(old_len)
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        out = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out
