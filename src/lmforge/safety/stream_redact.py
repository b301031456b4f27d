"""Redact a text stream chunk by chunk without ever letting a sensitive string out in pieces.

A hold-back buffer keeps the last `hold_back` characters (and any detected span reaching into
them) until more text arrives; only text that no future chunk can turn into part of a match is
released, redacted. With every match shorter than `hold_back`, the concatenated output equals
redacting the whole text at once, for any way the stream is split.
"""
from __future__ import annotations

from collections.abc import Callable

# finder(text) -> [(start, end, replacement)], non-overlapping, sorted by start
Finder = Callable[[str], list[tuple[int, int, str]]]


def apply_spans(text: str, spans) -> str:
    out, pos = [], 0
    for start, end, repl in spans:
        out += [text[pos:start], repl]
        pos = end
    out.append(text[pos:])
    return "".join(out)


class StreamRedactor:
    def __init__(self, finder: Finder, hold_back: int = 128, context: int = 64):
        self.finder, self.hold_back, self.context = finder, hold_back, context
        self.text = ""         # kept: `context` released characters (for look-behinds) + the pending ones
        self.released = 0      # how many characters of self.text were already released
        self.spans_seen: list[tuple[int, int, str]] = []  # (start, end, replacement) of what was redacted

    def feed(self, chunk: str) -> str:
        self.text += chunk
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        spans = self.finder(self.text)
        cut = len(self.text) if final else len(self.text) - self.hold_back
        for start, end, _ in spans:  # never cut through a match
            if start < cut < end:
                cut = start
        if cut <= self.released:
            return ""
        out, pos = [], self.released
        for start, end, repl in spans:
            if end <= self.released or start >= cut:
                continue
            # a match starting in already released text (seen only now, e.g. with less left
            # context) is redacted from the release point on: nothing more of it goes out
            out += [self.text[pos:max(start, pos)], repl]
            self.spans_seen.append((start, end, repl))
            pos = end
        out.append(self.text[pos:cut])
        drop = max(0, cut - self.context)  # keep a little released text as left context
        self.text, self.released = self.text[drop:], cut - drop
        return "".join(out)
