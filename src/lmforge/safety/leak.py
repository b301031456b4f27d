"""Find system-prompt text in a model's output: its secret-looking tokens (words with digits or
mixed case, such as a password or an API key) and any run of 6 of its words, case-insensitively."""
from __future__ import annotations

import re

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{3,}[A-Za-z0-9]")
RUN_WORDS = 6


def _secretish(tok: str) -> bool:
    return bool(re.search(r"\d", tok) and re.search(r"[A-Za-z]", tok)) or (sum(c.isupper() for c in tok) >= 4)


def leak_finder(system_prompt: str, replacement: str = "[REDACTED]"):
    """-> finder(text) -> [(start, end, replacement)] for text that reproduces the system prompt."""
    secrets = sorted({t for t in _TOKEN.findall(system_prompt) if _secretish(t)}, key=len, reverse=True)
    words = system_prompt.split()
    runs = {" ".join(words[i:i + RUN_WORDS]).lower() for i in range(len(words) - RUN_WORDS + 1)}
    pieces = [re.escape(s) for s in secrets]
    pieces += [r"\s+".join(re.escape(w) for w in r.split()) for r in sorted(runs, key=len, reverse=True)]
    if not pieces:
        return lambda text: []
    pattern = re.compile("|".join(pieces), re.IGNORECASE)

    def find(text: str) -> list[tuple[int, int, str]]:
        return [(m.start(), m.end(), replacement) for m in pattern.finditer(text)]
    return find


def max_leak_length(system_prompt: str) -> int:
    """The longest string the finder can match (before whitespace runs stretch it)."""
    words = system_prompt.split()
    toks = _TOKEN.findall(system_prompt)
    runs = [len(" ".join(words[i:i + RUN_WORDS])) for i in range(max(0, len(words) - RUN_WORDS + 1))]
    return max([len(t) for t in toks] + runs + [0])
