"""PII detection and redaction for text and code: e-mail addresses, phone numbers, IP addresses,
credit-card numbers (Luhn + issuer prefix), IBANs (length table + mod-97) and secrets (provider
key formats, private-key blocks, JWTs, credentials in URLs, high-entropy `password = "..."`).

Regexes find candidates; validators (`pii_validators`) keep only the ones that check out, which is
what keeps precision up on code full of version numbers, dates, hashes and big integers.
Redaction replaces each span with a typed placeholder such as `<EMAIL>`.
"""
from __future__ import annotations

import bisect
import re
from collections import Counter
from dataclasses import dataclass, field

from lmforge.data import pii_validators as v

TYPES = ("secret", "iban", "credit_card", "email", "ip_address", "phone")  # also the priority order

_EMAIL = re.compile(  # Unicode local parts and domains (főo@bar.com), obfuscated 'name [at] host [dot] org'
    r"(?<![\w.%+-])[\w.%+-]{1,64}"
    r"(?:@|\s?[\[(<]at[\])>]\s?)"
    r"(?:[^\W_](?:[\w-]{0,61}[^\W_])?(?:\.|\s?[\[(<]dot[\])>]\s?))+[^\W\d_]{2,24}(?!\w)")
_EMAIL_HINTS = ("@", "[at]", "(at)", "<at>")
_EXT = r"(?:\s?(?:x|ext\.?)\s?\d{1,6})?"  # an extension: 555-2671x123, 555-2671 ext. 12
_EXT_TAIL = re.compile(r"\s?(?:x|ext\.?)\s?\d{1,6}$")
_PHONE_KEYWORD = re.compile(r"(?i)(?:tel|phone|mobile|cell|fax|call|whatsapp|contact)\W{0,12}$")
_PHONES = [  # (regex, whether it needs a phone keyword just before it)
    (re.compile(r"(?<![\w+.-])\+\d{1,3}(?:\s?\(0\)\s?\d{1,5}|[\s.-](?:\(\d{1,5}\)|\d{1,5}))(?:[\s.-]\d{2,8}){0,5}"
                r"(?:[\s.-]?\d{2,8})?" + _EXT + r"(?![\w-]|\.\d)"), False),  # +49 (0)30 1234 5678
    (re.compile(r"(?<![\w+.-])\+\d{8,15}(?![\w-]|\.\d)"), True),  # E.164 without separators
    (re.compile(r"(?<![\w+.-])(?:(?:\+?1|001)[\s.-])?(?:\(\d{3}\)\s?\d{3}[\s.-]\d{4}|\d{3}([.-])\d{3}\1\d{4})"
                + _EXT + r"(?![\w-]|\.\d)"), False),  # North American: (415) 555-2671, 001-415-555-2671x12
    (re.compile(r"(?<![\w+.-])(?:\(0\d{1,4}\)\s?\d{2,4}[\s-]?\d{3,4}|0\d{2,4}[\s-]\d{3,4}[\s-]\d{3,4}|0[1-9](?:[ .]\d\d){4})"
                r"(?![\w-]|\.\d)"), False),  # national with trunk 0: 020 7946 0958, (030) 1234 5678, 01 42 68 53 00
]
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                   r"(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:|:){2,7}(?:[0-9A-Fa-f]{1,4}|:)(?![\w:])")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")  # every IPv6 address has '::' or ':h:'; starts with a literal
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){11,18}(?![\w-])")
_IBAN = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![\w])")
_IBAN_HINT = re.compile(r"[A-Z]{2}\d\d")
_NUMBER_BLOB = re.compile(r"[\d+(][\d .()/+-]{6,}")  # where phones, IPv4s and card numbers can be
_DATE_LIKE = re.compile(r"^\d{4}[ .-]\d{2}[ .-]\d{2}$|^\d{2}[ .-]\d{2}[ .-]\d{4}$")

# (literal hints, regex, group holding the secret) per credential format; a regex only runs when
# one of its hints occurs in the text, which is what keeps this fast on large corpora.
_SECRETS = [
    (("-----BEGIN",), re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END "
                                 r"(?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"), 0),
    (("AKIA", "ASIA", "ABIA", "ACCA"), re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}(?![A-Z0-9])"), 0),
    (("aws", "AWS", "Aws"), re.compile(r"(?i)aws.{0,20}?(?:secret|key).{0,20}?['\"]([A-Za-z0-9/+]{40})['\"]"), 1),
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
     re.compile(r"(?<!\w)(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{50,})(?!\w)"), 0),
    (("xox",), re.compile(r"(?<!\w)xox[abposr]-[A-Za-z0-9-]{10,}"), 0),
    (("hooks.slack.com",), re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9/]+"), 0),
    (("_live_", "_test_"), re.compile(r"(?<!\w)[rs]k_(?:live|test)_[A-Za-z0-9]{16,}(?!\w)"), 0),
    (("AIza",), re.compile(r"(?<![\w-])AIza[0-9A-Za-z_-]{35}(?![\w-])"), 0),
    (("sk-",), re.compile(r"(?<![\w-])sk-(?:proj-|ant-(?:api\d\d-)?)?[A-Za-z0-9_-]{20,}(?![\w-])"), 0),
    (("hf_",), re.compile(r"(?<!\w)hf_[A-Za-z0-9]{30,}(?!\w)"), 0),
    (("eyJ",), re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}(?![\w-])"), 0),
    (("://",), re.compile(r"(?i)\b[a-z][a-z0-9+.-]{1,15}://[^\s:/@'\"]{1,64}:([^\s@/'\"]{3,128})@[\w.-]+"), 1),
]
# `api_key = "..."`, `"password": "..."`, `DB_PASSWORD='...'`: the name must end in the keyword
_ASSIGNED_SECRET = re.compile(
    r"(?i)(?<![\w])(?:[\w.-]*[_.-])?(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?key|access[_-]?token|"
    r"auth[_-]?token|private[_-]?key|client[_-]?secret|password|passwd|pwd|token)['\"]?\s*(?:=|:|=>)\s*"
    r"(?:[rbuf]{0,2})['\"]([^'\"\s]{8,200})['\"]")
# the tail of such an assignment (keyword, operator, opening quote): a cheap scan that finds the
# few places where the full pattern can match
_ASSIGN_HINT = re.compile(r"(?:key|secret|token|password|passwd|pwd)['\"]?\s*(?:=|:|=>)\s*[rbuf]{0,2}['\"]")

@dataclass
class PIIConfig:
    enabled: bool = True
    types: list[str] = field(default_factory=lambda: list(TYPES))
    skip_private_ips: bool = True  # loopback, private, documentation ranges are not personal data
    placeholder: str = "<{TYPE}>"  # {TYPE}: EMAIL, PHONE, IP_ADDRESS, CREDIT_CARD, IBAN, SECRET
    secret_min_entropy: float = 3.0


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    type: str
    text: str


def _windows(text: str, positions, before: int, after: int):
    """Merged (start, end) windows around hint positions."""
    out: list[list[int]] = []
    for p in sorted(positions):
        lo, hi = max(0, p - before), min(len(text), p + after)
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def _find(pattern: re.Pattern, text: str, kind: str, check=None, group: int = 0, windows=None):
    for lo, hi in windows if windows is not None else [(0, len(text))]:
        for m in pattern.finditer(text, lo, hi):
            s = m.group(group)
            if s and (check is None or check(s, m.start(group))):
                yield Span(m.start(group), m.end(group), kind, s)


def _positions(text: str, needle: str):
    i = text.find(needle)
    while i >= 0:
        yield i
        i = text.find(needle, i + 1)


def _candidates(text: str, cfg: PIIConfig):
    wanted = set(cfg.types)
    if "secret" in wanted:
        for hints, pattern, group in _SECRETS:
            if any(h in text for h in hints):
                yield from _find(pattern, text, "secret", group=group)
        # on the lower-cased text (a case-insensitive scan is ~30x slower); positions can drift
        # by a character or two for rare non-ASCII case pairs, which the windows' margins absorb
        hints = [m.start() for m in _ASSIGN_HINT.finditer(text.lower())]
        if hints:
            yield from _find(_ASSIGNED_SECRET, text, "secret", lambda s, _: v.looks_like_secret(s, cfg.secret_min_entropy),
                             1, _windows(text, hints, 80, 240))
    if "email" in wanted:
        hits = [p for h in _EMAIL_HINTS for p in _positions(text, h)]
        if hits:
            yield from _find(_EMAIL, text, "email", windows=_windows(text, hits, 72, 264))
    if {"credit_card", "ip_address", "phone"} & wanted:
        ip_blobs, long_blobs = [], []  # an IPv4 has 3 dots; phones and cards have 9+ digits
        for m in _NUMBER_BLOB.finditer(text):
            window = (max(0, m.start() - 1), min(len(text), m.end() + 12))  # + a phone extension
            if text.count(".", *window) >= 3:
                ip_blobs.append(window)
            if sum(map(str.isdigit, m.group())) >= 9:
                long_blobs.append(window)
        if "credit_card" in wanted:
            yield from _find(_CARD, text, "credit_card", lambda s, at: _card_ok(text, s, at), windows=long_blobs)
        if "ip_address" in wanted:
            yield from _find(_IPV4, text, "ip_address", lambda s, _: v.public_ip(s, cfg.skip_private_ips),
                             windows=ip_blobs)
        if "phone" in wanted:
            for pattern, needs_keyword in _PHONES:
                yield from _find(pattern, text, "phone", lambda s, at, k=needs_keyword: _phone_ok(text, s, at, k),
                                 windows=long_blobs)
    if "ip_address" in wanted and ":" in text:
        hints = [m.start() for m in _IPV6_HINT.finditer(text)]
        yield from _find(_IPV6, text, "ip_address", lambda s, _: v.public_ip(s, cfg.skip_private_ips),
                         windows=_windows(text, hints, 40, 48))
    if "iban" in wanted:
        hints = [m.start() for m in _IBAN_HINT.finditer(text)]
        yield from _find(_IBAN, text, "iban", lambda s, _: v.iban_ok(s), windows=_windows(text, hints, 1, 48))


_IBAN_HEAD = re.compile(r"[A-Z]{2}\d{2} ?(?:[A-Z0-9]{4} ?)*$")


def _card_ok(text: str, s: str, at: int) -> bool:
    if _IBAN_HEAD.search(text, max(0, at - 40), at):
        return False  # the digits of an IBAN (one that failed its own checksum)
    digits = s.replace(" ", "").replace("-", "")
    if digits == s and len(digits) not in (15, 16):
        return False  # long bare integers in code: only the common card lengths count
    return v.card_network(digits) is not None


_GROUP_BEFORE = re.compile(r"[A-Z0-9]{4} $")


def _phone_ok(text: str, s: str, at: int, needs_keyword: bool) -> bool:
    s = _EXT_TAIL.sub("", s)  # the extension's digits are not part of the number's length
    if not v.phone_digits_ok(s) or _DATE_LIKE.match(s) or _GROUP_BEFORE.search(text, max(0, at - 5), at):
        return False
    if s.startswith("0") and not s.startswith("001") and not 10 <= sum(c.isdigit() for c in s) <= 11:
        return False
    return not needs_keyword or bool(_PHONE_KEYWORD.search(text, max(0, at - 24), at))


def detect(text: str, cfg: PIIConfig | None = None) -> list[Span]:
    """Non-overlapping PII spans in text order; on overlap the earlier type in TYPES wins, then
    the longer span."""
    cfg = cfg or PIIConfig()
    rank = {t: i for i, t in enumerate(TYPES)}
    spans = sorted(set(_candidates(text, cfg)), key=lambda s: (rank[s.type], s.start - s.end, s.start))
    starts: list[int] = []
    taken: list[Span] = []  # kept sorted by start, non-overlapping
    for s in spans:
        i = bisect.bisect_left(starts, s.start)
        if (i == 0 or taken[i - 1].end <= s.start) and (i == len(taken) or s.end <= taken[i].start):
            starts.insert(i, s.start)
            taken.insert(i, s)
    return taken


def placeholder(kind: str, cfg: PIIConfig) -> str:
    return cfg.placeholder.replace("{TYPE}", kind.upper())


def redact(text: str, cfg: PIIConfig | None = None) -> tuple[str, Counter]:
    """Text with every detected span replaced by its placeholder, and counts by type."""
    cfg = cfg or PIIConfig()
    spans = detect(text, cfg)
    if not spans:
        return text, Counter()
    out, pos = [], 0
    for s in spans:
        out += [text[pos:s.start], placeholder(s.type, cfg)]
        pos = s.end
    out.append(text[pos:])
    return "".join(out), Counter(s.type for s in spans)
