"""The guard: screens a chat's untrusted messages before the model sees them and filters what the
model says back, under one policy; every decision is logged with its reasons and reported to
listeners (the server counts them in /metrics).

Input: normalise -> heuristics -> classifier; a score at or above the classifier's threshold is an
attack, and the input policy decides: `block` (refuse the request), `redact` (pass on the
normalised text with the matched instructions and role markers cut out) or `flag` (log only).
Role-marker smuggling (typed `<|im_start|>system` and the like) is always logged, whatever the score.

Output: PII (data/pii.py) and system-prompt leaks are found in the reply; `redact` replaces them,
`block` replaces the whole reply with a refusal (streamed replies cannot be recalled, so streaming
always redacts), `flag` logs only. Streaming uses a hold-back buffer (stream_redact.py).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError
from lmforge.safety.analysis import analyse
from lmforge.safety.classifier import Classifier, RuleClassifier
from lmforge.safety.heuristics import RULES
from lmforge.safety.leak import leak_finder, max_leak_length
from lmforge.safety.normalize import normalize
from lmforge.safety.output_pii import reply_pii_finder
from lmforge.safety.stream_redact import StreamRedactor, apply_spans

log = logging.getLogger("lmforge.safety.guard")
POLICIES = ("block", "redact", "flag")
REFUSAL = "I can't help with that request."
LEAK, BANNED = "[REDACTED]", "[REMOVED]"  # what replaces a system-prompt leak, a banned string
PII_HOLD_BACK = 96  # longer than any e-mail, phone, card, IBAN or IP address the detector matches


@dataclass
class GuardConfig:
    input_policy: str = "block"
    output_policy: str = "redact"
    pii: bool = True            # redact PII in replies
    leaks: bool = True          # catch the system prompt in replies
    banned: tuple[str, ...] = ()  # more strings to keep out of replies (case-insensitive)

    def __post_init__(self):
        for name in ("input_policy", "output_policy"):
            if getattr(self, name) not in POLICIES:
                raise LmforgeError(f"guard {name} must be one of {', '.join(POLICIES)}, got {getattr(self, name)!r}")


@dataclass
class Decision:
    direction: str              # "input" or "output"
    action: str                 # "allow", "block", "redact" or "flag"
    score: float = 0.0
    reasons: list[str] = field(default_factory=list)
    text: str | None = None     # the replacement text (redacted input or filtered output)
    messages: list[dict] | None = None  # redacted input messages (input policy `redact`)

    @property
    def reason(self) -> str:
        """The main reason, as counted in /metrics."""
        return self.reasons[0] if self.reasons else "none"


def merge_spans(*span_lists) -> list[tuple[int, int, str]]:
    """Non-overlapping spans: the earliest start wins, then the longest."""
    out: list[tuple[int, int, str]] = []
    for s in sorted((s for spans in span_lists for s in spans), key=lambda s: (s[0], s[0] - s[1])):
        if not out or s[0] >= out[-1][1]:
            out.append(s)
    return out


def _system_prompt(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages if m.get("role") == "system" and isinstance(m.get("content"), str))


class Guard:
    def __init__(self, classifier: Classifier | None = None, config: GuardConfig | None = None):
        self.classifier = classifier or RuleClassifier()
        self.config = config or GuardConfig()
        self.listeners: list[Callable[[Decision], None]] = []

    def _report(self, d: Decision) -> Decision:
        level = logging.WARNING if d.action != "allow" else logging.DEBUG
        log.log(level, "guard %s %s score=%.3f reasons=%s", d.direction, d.action, d.score, ",".join(d.reasons) or "-")
        for listener in self.listeners:
            listener(d)
        return d

    # --- input ------------------------------------------------------------------------------------
    def check_messages(self, messages: list[dict]) -> Decision:
        """Screen every message but the system prompt (the operator's): user turns, pasted
        documents and client-supplied assistant history are all untrusted."""
        untrusted = [m for m in messages if m.get("role") != "system"]
        d = self.check_text("\n".join(str(m.get("content", "")) for m in untrusted))
        if d.action == "redact":
            d.messages = [m if m.get("role") == "system" else {**m, "content": _sanitise(str(m.get("content", "")))}
                          for m in messages]
        return d

    def check_text(self, text: str) -> Decision:
        a = analyse(text)
        score = float(self.classifier.score([a])[0])
        reasons = a.reasons()
        if any(h.rule == "role_marker" for h in a.hits):
            markers = [m.group() for m in RULES["role_marker"][1].finditer(a.norm.text)]
            log.warning("guard: role-marker smuggling attempt: %s", " ".join(markers)[:200])
        if score < self.classifier.threshold:
            return self._report(Decision("input", "allow", score, reasons))
        if not reasons:
            reasons = ["classifier"]
        policy = self.config.input_policy
        text_out = None
        if policy == "redact":
            text_out = _sanitise(text)
        return self._report(Decision("input", policy, score, reasons, text_out))

    # --- output -----------------------------------------------------------------------------------
    def _output_finder(self, messages: list[dict]):
        finders = []
        if self.config.pii:
            finders.append(reply_pii_finder())
        system = _system_prompt(messages)
        if self.config.leaks and system:
            finders.append(leak_finder(system))
        if self.config.banned:
            banned = re.compile("|".join(re.escape(b) for b in self.config.banned if b), re.IGNORECASE)
            finders.append(lambda text: [(m.start(), m.end(), BANNED) for m in banned.finditer(text)])
        return lambda text: merge_spans(*(f(text) for f in finders))

    def _output_decision(self, spans, score_text: str, streamed: bool) -> Decision | None:
        if not spans:
            return None
        names = {LEAK: "system_prompt_leak", BANNED: "banned_string"}
        reasons = list(dict.fromkeys(names.get(r) or "pii_" + r.strip("<>").lower() for _, _, r in spans))
        action = self.config.output_policy
        if action == "block" and streamed:
            action = "redact"
        return Decision("output", action, 1.0, reasons, score_text)

    def filter_output(self, text: str, messages: list[dict]) -> str:
        """A whole (non-streamed) reply, filtered by the output policy."""
        spans = self._output_finder(messages)(text)
        d = self._output_decision(spans, text, streamed=False)
        if d is None:
            return text
        d.text = {"block": REFUSAL, "redact": apply_spans(text, spans), "flag": text}[d.action]
        self._report(d)
        return d.text

    def output_stream(self, messages: list[dict]) -> GuardedStream:
        return GuardedStream(self, messages)


class GuardedStream:
    """Per-choice filter of a streamed reply: feed(chunk) -> text to send now; finish() -> the rest."""

    def __init__(self, guard: Guard, messages: list[dict]):
        self.guard = guard
        hold = max(PII_HOLD_BACK, max_leak_length(_system_prompt(messages)) + 32)
        self.finder = guard._output_finder(messages)
        self.flag_only = guard.config.output_policy == "flag"  # pass through, detect at the end
        self.full: list[str] = []
        self.redactor = StreamRedactor(self.finder, hold_back=hold)

    def feed(self, chunk: str) -> str:
        if self.flag_only:
            self.full.append(chunk)
            return chunk
        return self.redactor.feed(chunk)

    def finish(self) -> str:
        out = "" if self.flag_only else self.redactor.finish()
        spans = self.finder("".join(self.full)) if self.flag_only else self.redactor.spans_seen
        d = self.guard._output_decision(spans, None, streamed=True)
        if d is not None:
            self.guard._report(d)
        return out


def _sanitise(text: str) -> str:
    """The normalised text with every rule match (instructions, role markers) cut out."""
    norm = normalize(text).text
    spans = merge_spans([(m.start(), m.end(), "[REMOVED]") for _, p in RULES.values() for m in p.finditer(norm)])
    return apply_spans(norm, spans)
