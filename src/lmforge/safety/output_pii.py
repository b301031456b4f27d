"""PII in a model's reply: data/pii.py's detector (tuned for precision on code corpora) plus two
recall-first patterns that suit chat replies: bare card numbers of any issuer length (12-19
digits, Luhn-valid) and phone numbers written without the separators the corpus rules require."""
from __future__ import annotations

import re

from lmforge.data import pii_validators as v
from lmforge.data.pii import PIIConfig, detect, placeholder

_DIGIT_RUN = re.compile(r"(?<![\w.+-])(?:\+|00)?\(?\d[\d ().-]{7,22}\d(?![\w-]|\.\d)")
_DATE_OR_VERSION = re.compile(r"^\d{1,4}[./-]\d{1,2}[./-]\d{1,4}$|^\d+(?:\.\d+)+$")  # dates, versions, decimals


def _extra_spans(text: str) -> list[tuple[int, int, str]]:
    out = []
    for m in _DIGIT_RUN.finditer(text):
        s, start = m.group(), m.start()
        if s.startswith("(") and ")" not in s:  # "(4111 1111 ...)": the parenthesis is not the number's
            s, start = s[1:], start + 1
        digits = re.sub(r"\D", "", s)
        if _DATE_OR_VERSION.match(s) or s.count(".") >= 3:
            continue  # dates, versions and IPv4 addresses are not phones or cards
        if 12 <= len(digits) <= 19 and re.fullmatch(r"\d+(?:[ -]\d+)*", s) and len(set(digits)) > 1 and v.luhn_ok(digits):
            out.append((start, m.end(), "CREDIT_CARD"))
        elif 9 <= len(digits) <= 15 and len(set(digits)) > 2:
            out.append((start, m.end(), "PHONE"))
    return out


def reply_pii_finder(cfg: PIIConfig | None = None):
    """finder(text) -> [(start, end, placeholder)]: the corpus detector's spans, then the extra
    ones where they do not overlap."""
    cfg = cfg or PIIConfig()

    def find(text: str) -> list[tuple[int, int, str]]:
        spans = [(s.start, s.end, placeholder(s.type, cfg)) for s in detect(text, cfg)]
        taken = list(spans)
        for start, end, kind in _extra_spans(text):
            if all(end <= a or start >= b for a, b, _ in taken):
                taken.append((start, end, placeholder(kind.lower(), cfg)))
        return sorted(taken)
    return find
