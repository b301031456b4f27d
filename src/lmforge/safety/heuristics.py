"""Hand-written rules for prompt injection and jailbreaks, run on every normalised view.

Each rule has a name (the reason logged with a decision) and a weight: the score a rule alone
gives when no classifier is loaded. A hit in a decoded view (base64, rot13, ...) is reported as
`rule@view`, since an instruction that was hidden is itself a signal.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lmforge.safety.normalize import Normalized

_I = re.IGNORECASE | re.DOTALL
_VERB = r"(?:ignore|disregard|forget|override|overrule|bypass|skip|drop|abandon|discard|throw away|set aside)"
_WHAT = r"(?:instructions?|prompts?|rules|directions|directives|guidelines|guardrails|context|constraints|programming|restrictions|orders|policies|system message)"
_PRIOR = r"(?:previous|prior|above|earlier|preceding|all|any|every|your|the|those|these|original|initial|system|developer|safety)"

RULES: dict[str, tuple[float, re.Pattern]] = {
    "instruction_override": (0.9, re.compile(
        rf"\b{_VERB}\b[^.\n]{{0,40}}?\b{_PRIOR}\b[^.\n]{{0,30}}?\b{_WHAT}\b"
        r"|\bnew (?:instructions?|rules|task)\s*[:!-]|\bfrom now on,? you (?:will|must|are|shall)\b"
        r"|\b(?:follow|obey|treat|use) (?:them|it|this|these|that) as (?:your )?new (?:instructions?|rules|orders)\b"
        r"|\byour (?:new|real|true) (?:instructions?|task|purpose) (?:is|are)\b", _I)),
    "roleplay_jailbreak": (0.85, re.compile(
        r"\bDAN\b|\bdo anything now\b|\bjail ?broken?\b|\bdeveloper mode\b|\bgod ?mode\b"
        r"|\b(?:no|without any|free of|free from) (?:restrictions|filters|limits|rules|guidelines|censorship)\b"
        r"|\b(?:unfiltered|uncensored|unrestricted|amoral) (?:ai|assistant|model|mode|version)\b"
        r"|\bpretend (?:that )?you (?:have|are) (?:no|an? (?:ai|assistant|model) (?:with|without))"
        r"|\bstay in character\b.{0,80}\b(?:rules|restrictions|refuse)", _I)),
    "prompt_extraction": (0.8, re.compile(
        r"\b(?:reveal|repeat|print|show|output|display|leak|tell me|give me|recite|dump|spell out|write out|what (?:is|are|was))\b"
        r"[^.\n?]{0,40}?\b(?:system|hidden|secret|initial|original|previous|above|developer)\s+(?:prompt|instructions?|message|text|password|code|key|rules)"
        r"|\b(?:everything|all|the text|the words|what is written) (?:above|before) (?:this|here)\b"
        r"|\bverbatim\b.{0,40}\b(?:instructions?|prompt|above)\b"
        r"|\bstarting with ['\"]?you are\b", _I)),
    "role_marker": (0.95, re.compile(
        r"<\|(?:im_start|im_end|system|user|assistant|endoftext|eot_id|start_header_id|end_header_id|begin_of_text)\|>"
        r"(?:(?:system|user|assistant|developer|tool)\b)?"
        r"|\[/?INST\]|<</?SYS>>|<\|?(?:start|end)_of_turn\|?>|^\s*#{2,3} ?(?:system|instruction)\s*:"
        r"|^\s*(?:system|assistant)\s*:\s*(?:you|ignore|new|override)", _I | re.MULTILINE)),
    "rogue_output": (0.6, re.compile(
        r"\b(?:say|print|reply|respond|answer|output|write)\b[^.\n]{0,30}?\b(?:only|exactly|just|with)\b"
        r"[^.\n]{0,20}?['\"“]?(?:i have been pwned|pwned|hacked|access granted)", _I)),
    "payload_delivery": (0.5, re.compile(
        r"\b(?:decode|decrypt|translate|rot13|base64|hex)\b[^.\n]{0,60}\b(?:then|and)\b[^.\n]{0,30}"
        r"\b(?:follow|obey|execute|do|perform|carry out)\b", _I)),
}
# tricks found by normalisation, and their weight alone
FINDING_WEIGHTS = {"unicode_tags": 0.9, "invisible": 0.3, "homoglyphs": 0.4, "base64": 0.2, "hex": 0.2}


@dataclass(frozen=True)
class Hit:
    rule: str
    view: str      # "text" or the name of the decoded view it was found in
    excerpt: str

    @property
    def reason(self) -> str:
        return self.rule if self.view == "text" else f"{self.rule}@{self.view}"


def find_hits(norm: Normalized) -> list[Hit]:
    hits = []
    for view, text in [("text", norm.text), *norm.views.items()]:
        for name, (_, pattern) in RULES.items():
            if view in ("rot13", "leet") and name == "role_marker":
                continue  # the marker characters do not survive these readings
            m = pattern.search(text)
            if m:
                hits.append(Hit(name, view, m.group()[:80]))
    return hits


def rule_score(norm: Normalized, hits: list[Hit]) -> float:
    """The strongest single signal: a rule's weight, or a normalisation trick's."""
    scores = [RULES[h.rule][0] for h in hits] + [FINDING_WEIGHTS.get(f, 0.0) for f in norm.findings]
    return max(scores, default=0.0)
