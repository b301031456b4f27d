"""How many draft tokens a sequence asks for: adapted to how well its drafts have been doing.

A verify pass over k draft tokens costs more than a plain decode step (k more rows through every
matmul, the multi-token attention path), which only pays when drafts are accepted. Open-ended text
gives prompt lookup short, mostly rejected matches, so each sequence keeps its own budget:
- a fully accepted draft raises the limit by one (up to the configured k);
- a partly accepted one sets it to the accepted length + 1 (what would have been enough);
- a fully rejected one drops it to 1, and repeated misses pause speculation for 2, 4, 8 ... (at
  most 32) steps, which then run as plain decode steps; any accepted token ends the pause.
Greedy output does not depend on the budget (verification decides every token), only speed does."""
from __future__ import annotations

from dataclasses import dataclass

MAX_PAUSE = 32


@dataclass
class DraftBudget:
    k: int                      # the configured maximum
    limit: int = 0              # draft tokens to ask for next time
    misses: int = 0             # fully rejected drafts in a row
    pause: int = 0              # steps left without speculation

    def __post_init__(self):
        self.limit = self.limit or self.k

    def allowed(self) -> int:
        """Draft tokens this step may use (0 while paused); call once per decode step."""
        if self.pause:
            self.pause -= 1
            return 0
        return self.limit

    def update(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        if accepted == drafted:
            self.limit, self.misses = min(self.k, self.limit + 1), 0
        elif accepted:
            self.limit, self.misses = accepted + 1, 0
        else:
            self.limit, self.misses = 1, self.misses + 1
            if self.misses >= 2:
                self.pause = min(MAX_PAUSE, 2 ** (self.misses - 1))
