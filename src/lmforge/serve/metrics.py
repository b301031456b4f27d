"""Serving metrics in the Prometheus text exposition format (no client library needed).

Updated from the engine thread, read by the /metrics handler; one lock guards both sides.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets=LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)   # last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for le, c in zip(list(self.buckets) + ["+Inf"], self.counts):
            running += c
            lines.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        lines += [f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return lines


class ServeMetrics:
    def __init__(self, window_s: float = 10.0):
        self.lock = threading.Lock()
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "Time from request arrival to its first token.")
        self.itl = Histogram("lmforge_inter_token_latency_seconds", "Time between consecutive tokens of a request.")
        self.e2e = Histogram("lmforge_request_latency_seconds", "Time from arrival to the last token.")
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.rejected = 0
        self.cancelled = 0
        self.guard: dict[tuple[str, str, str], int] = {}  # (direction, action, reason) -> decisions
        self.window_s = window_s
        self.recent: deque[tuple[float, int]] = deque()   # (time, tokens) of recent steps

    def on_tokens(self, now: float, n: int) -> None:
        with self.lock:
            self.generation_tokens += n
            self.recent.append((now, n))
            while self.recent and self.recent[0][0] < now - self.window_s:
                self.recent.popleft()

    def on_first_token(self, latency: float, prompt_tokens: int) -> None:
        with self.lock:
            self.ttft.observe(latency)
            self.prompt_tokens += prompt_tokens

    def on_inter_token(self, latency: float) -> None:
        with self.lock:
            self.itl.observe(latency)

    def on_finish(self, reason: str, latency: float) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.e2e.observe(latency)

    def on_reject(self) -> None:
        with self.lock:
            self.rejected += 1

    def on_cancel(self) -> None:
        with self.lock:
            self.cancelled += 1

    def on_guard(self, direction: str, action: str, reason: str) -> None:
        with self.lock:
            key = (direction, action, reason)
            self.guard[key] = self.guard.get(key, 0) + 1

    def tokens_per_second(self, now: float | None = None) -> float:
        now = now or time.monotonic()
        with self.lock:
            recent = [(t, n) for t, n in self.recent if t >= now - self.window_s]
        return sum(n for _, n in recent) / self.window_s if recent else 0.0

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """Everything, plus the given gauges {name: (help, value)}, as Prometheus text."""
        tps = self.tokens_per_second()
        with self.lock:
            lines = []
            counters = {
                "lmforge_prompt_tokens_total": ("Prompt tokens processed.", self.prompt_tokens),
                "lmforge_generation_tokens_total": ("Tokens generated.", self.generation_tokens),
                "lmforge_requests_rejected_total": ("Requests refused with 429 (queue full).", self.rejected),
                "lmforge_requests_cancelled_total": ("Requests cancelled before finishing (client gone).", self.cancelled),
            }
            for name, (help_text, value) in counters.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
            lines += ["# HELP lmforge_requests_finished_total Finished requests by finish reason.",
                      "# TYPE lmforge_requests_finished_total counter"]
            lines += [f'lmforge_requests_finished_total{{reason="{r}"}} {c}' for r, c in sorted(self.finished.items())]
            lines += ["# HELP lmforge_guard_decisions_total Guard decisions by direction, action and main reason.",
                      "# TYPE lmforge_guard_decisions_total counter"]
            lines += [f'lmforge_guard_decisions_total{{direction="{d}",action="{a}",reason="{r}"}} {c}'
                      for (d, a, r), c in sorted(self.guard.items())]
            all_gauges = {"lmforge_generation_tokens_per_second":
                          (f"Tokens generated per second over the last {self.window_s:.0f} s.", tps), **gauges}
            for name, (help_text, value) in all_gauges.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
            for h in (self.ttft, self.itl, self.e2e):
                lines += h.render()
        return "\n".join(lines) + "\n"
