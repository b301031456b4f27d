"""Text and URL normalisation.

Text: Unicode NFC; line endings to `\\n`; exotic spaces to plain spaces; zero-width characters,
the BOM and control characters (other than tab and newline) removed; trailing spaces stripped;
runs of blank lines capped. Indentation is never touched, so code keeps its meaning.

URL (web records): lower-case scheme and host, default ports and fragments dropped, `www.`
optionally dropped, tracking parameters (utm_*, fbclid, gclid, ...) removed, remaining query
parameters sorted, dot segments resolved, percent-escapes of unreserved characters decoded,
trailing slashes dropped. Two records whose URLs normalise to the same string are one page.
"""
from __future__ import annotations

import posixpath
import re
import unicodedata
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INVISIBLE = re.compile("[\u200b-\u200d\u2060\ufeff\u00ad]")
_CONTROL_CHARS = [chr(c) for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]]
_CONTROL = re.compile("[" + "".join(_CONTROL_CHARS) + "]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_RUN_OF_SPACES = re.compile(r"(?<=\S)[ \t]{2,}")

DEFAULT_TRACKING = ("utm_*", "fbclid", "gclid", "dclid", "msclkid", "yclid", "mc_cid", "mc_eid", "_ga",
                    "_gl", "igshid", "ref_src", "spm", "si", "mkt_tok", "oly_anon_id", "oly_enc_id", "vero_id")


@dataclass
class NormalizeConfig:
    enabled: bool = True
    nfc: bool = True
    max_blank_lines: int = 2  # longer runs of empty lines are cut to this many
    collapse_spaces_in_text: bool = True  # runs of inner spaces -> one, for prose only (not code)
    url_dedup: bool = True
    url_dedup_ignores_scheme: bool = True  # http://x/a and https://x/a are one page
    strip_www: bool = True
    tracking_params: list[str] = field(default_factory=lambda: list(DEFAULT_TRACKING))


def normalize_text(text: str, cfg: NormalizeConfig, is_code: bool = False) -> str:
    # each step first checks cheaply (C-speed `in`, isascii) whether it has anything to do:
    # most documents are clean, and a regex pass over every byte is what costs
    if not text.isascii():
        if cfg.nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        text = _INVISIBLE.sub("", _SPACES.sub(" ", text))
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if any(c in text for c in _CONTROL_CHARS):
        text = _CONTROL.sub("", text)
    if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
        text = _TRAILING.sub("", text)
    if cfg.collapse_spaces_in_text and not is_code and ("  " in text or "\t" in text):
        text = _RUN_OF_SPACES.sub(" ", text)
    if cfg.max_blank_lines >= 0 and "\n" * (cfg.max_blank_lines + 2) in text:
        text = re.sub("\n{%d,}" % (cfg.max_blank_lines + 2), "\n" * (cfg.max_blank_lines + 1), text)
    ends_with_newline = text.endswith("\n")
    text = text.strip("\n")
    return text + "\n" if ends_with_newline and text else text


_UNRESERVED = "-._~"
_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}


def _is_tracking(name: str, patterns: list[str]) -> bool:
    name = name.lower()
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def _clean_path(path: str) -> str:
    """Canonical escaping, dot segments resolved, no trailing slash (/a/ and /a are one page)."""
    path = quote(unquote(path), safe="/:@!$&'()*+,;=" + _UNRESERVED)
    if not path:
        return ""
    path = "/" + posixpath.normpath(path).lstrip("/")
    return "" if path in ("/", "/.") else path


def normalize_url(url: str, cfg: NormalizeConfig | None = None) -> str | None:
    """Canonical form of a URL, or None when it is not an absolute http(s)/ftp URL."""
    cfg = cfg or NormalizeConfig()
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if cfg.strip_www and host.startswith("www."):
        host = host[4:]
    # credentials (user:pass@) are left out on purpose: they do not name the page
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if not _is_tracking(k, cfg.tracking_params)]
    return urlunsplit((scheme, netloc, _clean_path(parts.path), urlencode(sorted(query)), ""))


def url_dedup_key(url: str, cfg: NormalizeConfig) -> str | None:
    """The string two records must share to count as the same page."""
    canonical = normalize_url(url, cfg)
    if canonical is None or not cfg.url_dedup_ignores_scheme:
        return canonical
    return canonical.split("://", 1)[1]
