"""One prompt, read by the guard: its normalised views and the rules they hit."""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.safety.heuristics import RULES, Hit, find_hits, rule_score
from lmforge.safety.normalize import Normalized, normalize


@dataclass(frozen=True)
class Analysis:
    norm: Normalized
    hits: tuple[Hit, ...]

    @property
    def rule_score(self) -> float:
        return rule_score(self.norm, list(self.hits))

    def reasons(self) -> list[str]:
        """Rules hit (strongest first) and the normalisation tricks found, deduplicated."""
        ranked = sorted(self.hits, key=lambda h: -RULES[h.rule][0])
        return list(dict.fromkeys([h.reason for h in ranked] + self.norm.findings))


def analyse(text: str) -> Analysis:
    norm = normalize(text)
    return Analysis(norm, tuple(find_hits(norm)))
