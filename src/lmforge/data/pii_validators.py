"""Checksums and tables that turn PII regex candidates into confident detections."""
from __future__ import annotations

import ipaddress
import math
from collections import Counter

# IBAN lengths by country (ISO 13616 registry); an IBAN must have exactly this many characters.
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29,
    "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}

# Issuer prefixes (IIN ranges) and lengths of the major card networks.
CARD_NETWORKS = [
    # (name, lengths, prefix ranges as (low, high) over the first len(str(low)) digits)
    ("visa", {13, 16, 19}, [(4, 4)]),
    ("mastercard", {16}, [(51, 55), (2221, 2720)]),
    ("amex", {15}, [(34, 34), (37, 37)]),
    ("discover", {16, 17, 18, 19}, [(6011, 6011), (644, 649), (65, 65)]),
    ("jcb", {16, 17, 18, 19}, [(3528, 3589)]),
    ("diners", {14, 15, 16, 17, 18, 19}, [(300, 305), (36, 36), (38, 39)]),
    ("unionpay", {16, 17, 18, 19}, [(62, 62)]),
    ("maestro", {12, 13, 14, 15, 16, 17, 18, 19}, [(50, 50), (56, 58), (67, 67)]),
]


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_network(digits: str) -> str | None:
    """The network a Luhn-valid number of plausible length and prefix belongs to, else None."""
    if not digits.isdigit() or len(set(digits)) < 2 or not luhn_ok(digits):
        return None
    for name, lengths, ranges in CARD_NETWORKS:
        if len(digits) in lengths:
            for low, high in ranges:
                if low <= int(digits[:len(str(low))]) <= high:
                    return name
    return None


def iban_ok(candidate: str) -> bool:
    iban = candidate.replace(" ", "").upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit() or not iban.isalnum():
        return False
    rearranged = iban[4:] + iban[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)  # A=10 ... Z=35
    return int(number) % 97 == 1


def public_ip(candidate: str, skip_private: bool = True) -> bool:
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    if not skip_private:
        return True
    return not (ip.is_private or ip.is_loopback or ip.is_unspecified or ip.is_link_local
                or ip.is_multicast or ip.is_reserved)


def phone_digits_ok(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    return 9 <= digits <= 15


def shannon_entropy(s: str) -> float:
    """Bits per character of s's character distribution."""
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


PLACEHOLDER_WORDS = ("xxx", "your", "example", "changeme", "placeholder", "dummy", "redacted", "secret",
                     "password", "token", "<", ">", "${", "{{", "%(", "***", "...")


def looks_like_secret(value: str, min_entropy: float = 3.0) -> bool:
    """A credential value rather than a placeholder, a variable name or a format string."""
    low = value.lower()
    if any(w in low for w in PLACEHOLDER_WORDS):
        return False
    classes = sum([any(c.islower() for c in value), any(c.isupper() for c in value),
                   any(c.isdigit() for c in value), any(not c.isalnum() for c in value)])
    return classes >= 2 and shannon_entropy(value) >= min_entropy
