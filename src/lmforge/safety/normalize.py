"""Undo the tricks that hide an instruction from a filter, before any rule or classifier looks.

`normalize(text)` returns the text after Unicode NFKC, with invisible characters removed, Unicode
tag characters decoded (they spell ASCII invisibly), homoglyphs folded to Latin, plus extra
*views*: payloads decoded from base64 and hex runs, the rot13 of the text and its leetspeak
reading. Rules run on every view; `findings` names each trick that was actually used.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
from dataclasses import dataclass, field

# zero-width, joiners, word joiner and invisible operators, BOM, soft hyphen, bidi controls
_INVISIBLE = re.compile("[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
                        "\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufe00-\ufe0f\ufeff]")
_TAGS = re.compile("[\U000e0000-\U000e007f]+")
# Cyrillic and Greek letters that render like Latin ones (the common confusables)
_HOMOGLYPHS = str.maketrans({
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s",
    "ԁ": "d", "ɡ": "g", "һ": "h", "ӏ": "l", "ԛ": "q", "ԝ": "w", "А": "A", "В": "B", "Е": "E", "К": "K",
    "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T", "Х": "X", "І": "I", "Ј": "J", "Ѕ": "S",
    "α": "a", "ο": "o", "ν": "v", "ι": "i", "κ": "k", "ρ": "p", "τ": "t", "υ": "u", "Α": "A", "Β": "B",
    "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T",
    "Υ": "Y", "Χ": "X"})
_CONFUSABLE = re.compile("[" + "".join(chr(c) for c in _HOMOGLYPHS) + "]")
_LATIN = re.compile(r"[A-Za-z]")
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a",
                       "$": "s", "!": "i", "|": "l", "+": "t"})
_B64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/=_-])")
_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:(?:\\x|0x)?[0-9A-Fa-f]{2}[\s:]?){8,}")
_WORD = re.compile(r"\S+")
_QUOTED = re.compile(r"(?<!\w)['\"“‘]([^'\"“”‘’\n]{2,80})['\"”’](?!\w)")


@dataclass
class Normalized:
    text: str                                  # NFKC, invisibles removed, tags decoded inline, homoglyphs folded
    views: dict[str, str] = field(default_factory=dict)   # name -> another reading of the input
    findings: list[str] = field(default_factory=list)     # tricks found: "invisible", "unicode_tags", ...

    def joined(self) -> str:
        """The text plus every decoded payload: what a classifier should read."""
        extra = [v for k, v in self.views.items() if k in ("unicode_tags", "base64", "hex")]
        return "\n".join([self.text, *extra])


def _printable_share(s: str) -> float:
    return sum(c.isprintable() or c in "\n\t" for c in s) / max(1, len(s))


def _decode_b64(run: str) -> str | None:
    body = run.rstrip("=")
    if sum(c.isdigit() or c.isupper() for c in body) < 2 or not any(c.islower() for c in body):
        return None  # plain words and hex digests are not base64 payloads
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_" if ("-" in body or "_" in body) else None,
                               validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return text if len(text) >= 6 and _printable_share(text) > 0.95 and re.search(r"[A-Za-z]{3}", text) else None


def _decode_hex(run: str) -> str | None:
    digits = re.sub(r"\\x|0x|[\s:]", "", run)
    if len(digits) % 2:
        digits = digits[:-1]
    try:
        text = bytes.fromhex(digits).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return text if _printable_share(text) > 0.95 and re.search(r"[A-Za-z]{3} ?[A-Za-z]", text) else None


def _mixed_script_words(text: str) -> bool:
    return any(_CONFUSABLE.search(w) and _LATIN.search(w) for w in _WORD.findall(text))


def normalize(text: str) -> Normalized:
    out = Normalized(text="")
    hidden = "".join(chr(ord(c) - 0xE0000) for run in _TAGS.findall(text) for c in run)
    if hidden:
        out.findings.append("unicode_tags")
        out.views["unicode_tags"] = "".join(c for c in hidden if c.isprintable() or c in "\n\t")
    s = _TAGS.sub(lambda m: "".join(chr(ord(c) - 0xE0000) for c in m.group()), text)
    s = unicodedata.normalize("NFKC", s)
    if _INVISIBLE.search(s):
        out.findings.append("invisible")
        s = _INVISIBLE.sub("", s)
    if _mixed_script_words(s):
        out.findings.append("homoglyphs")
    s = s.translate(_HOMOGLYPHS)
    out.text = s
    decoded = [d for m in _B64.finditer(s) if (d := _decode_b64(m.group()))]
    if decoded:
        out.findings.append("base64")
        out.views["base64"] = "\n".join(decoded)
    decoded = [d for m in _HEX.finditer(s) if (d := _decode_hex(m.group().strip()))]
    if decoded:
        out.findings.append("hex")
        out.views["hex"] = "\n".join(decoded)
    quoted = _QUOTED.findall(s)
    if len(quoted) >= 2:  # fragments split across turns or variables, read joined up
        out.views["quotes"] = " ".join(quoted)
    out.views["rot13"] = codecs.encode(s, "rot13")
    if re.search(r"[A-Za-z][0-9@$!|+][A-Za-z]|[0-9@$][A-Za-z]{2}", s):
        out.views["leet"] = s.lower().translate(_LEET)
    return out
