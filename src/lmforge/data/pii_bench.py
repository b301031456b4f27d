"""A labelled synthetic PII benchmark, generated in code (no data files, no downloads).

Each document mixes prose and code snippets holding PII of every type in many real-world formats
(labelled spans) and hard negatives that look like PII but are not (versions, dates, hashes,
UUIDs, private IPs, numbers failing Luhn or mod-97, placeholder passwords). A detection counts as
a true positive when it overlaps a labelled span of the same type.

Caveat: the generator and the detector were written by the same hands, so the figures are an
upper bound on what to expect on real data; they are a regression test, not a leaderboard.
"""
from __future__ import annotations

import ipaddress
import random
import string
from collections import Counter

from lmforge.data.pii import TYPES, PIIConfig, detect
from lmforge.data.pii_validators import IBAN_LENGTHS, luhn_ok

FIRST = ["john", "maria", "wei", "aisha", "lars", "sofia", "raj", "chloe", "jose", "yuki", "omar", "eva"]
LAST = ["smith", "garcia", "chen", "okafor", "nielsen", "rossi", "patel", "martin", "silva", "tanaka"]
DOMAINS = ["example.com", "mail.example.org", "corp.acme.io", "uni-heidelberg.de", "post.co.uk", "fastmail.fm",
           "company.net", "students.uni.edu", "proton.me", "xn--mnchen-3ya.de"]


def _email(r: random.Random) -> str:
    f, last = r.choice(FIRST), r.choice(LAST)
    local = r.choice([f"{f}.{last}", f"{f[0]}{last}", f"{f}_{last}{r.randint(1, 99)}", f"{f}+news", f"{f}.{last}".upper()])
    domain = r.choice(DOMAINS)
    if r.random() < 0.1:
        return f"mailto:{local}@{domain}"
    if r.random() < 0.1:
        host, tld = domain.rsplit(".", 1)
        return f"{local} [at] {host} [dot] {tld}"
    return f"{local}@{domain}"


def _phone(r: random.Random) -> str:
    d = lambda n: "".join(r.choice(string.digits) for _ in range(n))  # noqa: E731
    area, ex = f"{r.randint(2, 9)}{d(2)}", f"{r.randint(2, 9)}{d(2)}"
    return r.choice([
        f"({area}) {ex}-{d(4)}", f"{area}-{ex}-{d(4)}", f"{area}.{ex}.{d(4)}", f"+1 {area} {ex} {d(4)}",
        f"+1-{area}-{ex}-{d(4)}", f"1-800-{ex}-{d(4)}", f"+44 20 {d(4)} {d(4)}", f"020 {d(4)} {d(4)}",
        f"+44 7700 {d(6)}", f"+49 30 {d(8)}", f"(030) {d(4)} {d(4)}", f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}",
        f"+91 {r.randint(6, 9)}{d(4)} {d(5)}", f"+81 3-{d(4)}-{d(4)}", f"+61 2 {d(4)} {d(4)}",
        f"+1 ({area}) {ex}-{d(4)}", f"Tel: +{r.randint(30, 49)}{d(9)}",
        f"{area} {ex} {d(4)}"])  # spaces only: left undetected on purpose (too many numbers look like it)


def _public_ipv4(r: random.Random) -> str:
    while True:
        ip = ipaddress.IPv4Address(r.getrandbits(32))
        if ip.is_global and not ip.is_multicast:
            return str(ip)


def _ip(r: random.Random) -> str:
    if r.random() < 0.75:
        return _public_ipv4(r) + (f":{r.randint(1, 65535)}" if r.random() < 0.2 else "")
    while True:
        ip = ipaddress.IPv6Address((0x2 << 124) | r.getrandbits(124))
        if ip.is_global:
            return ip.compressed if r.random() < 0.7 else ip.exploded


def _luhn_complete(prefix: str, length: int, r: random.Random) -> str:
    body = prefix + "".join(r.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return next(body + c for c in string.digits if luhn_ok(body + c))


def _card(r: random.Random) -> str:
    prefix, length = r.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15),
                               ("6011", 16), ("65", 16), ("3530", 16)])
    n = _luhn_complete(prefix, length, r)
    sep = r.choice([" ", "-", ""])
    if length == 15:
        return sep.join([n[:4], n[4:10], n[10:]])
    return sep.join(n[i:i + 4] for i in range(0, 16, 4))


def _iban(r: random.Random, valid: bool = True) -> str:
    country = r.choice(["DE", "GB", "FR", "NL", "ES", "IT", "CH", "BE", "AT", "PL", "SE", "IE"])
    n = IBAN_LENGTHS[country] - 4
    letters = {"GB": 4, "NL": 4, "IE": 4, "IT": 1}.get(country, 0)
    bban = "".join(r.choice(string.ascii_uppercase) for _ in range(letters))
    bban += "".join(r.choice(string.digits) for _ in range(n - letters))
    digits = "".join(str(int(c, 36)) for c in bban + country + "00")
    check = 98 - int(digits) % 97
    if not valid:  # check digits are unique in 2..98, so any other value fails mod-97
        check = r.choice([c for c in range(2, 99) if c != check])
    iban = f"{country}{check:02d}{bban}"
    return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4)) if r.random() < 0.5 else iban


def _token(r: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(r.choice(alphabet) for _ in range(n))


def _secret(r: random.Random) -> tuple[str, str, str]:
    """(context before, secret, context after): the labelled span is the secret only."""
    up = string.ascii_uppercase + string.digits
    kind = r.randrange(11)
    if kind == 0:
        return "aws_access_key_id = ", "AKIA" + _token(r, 16, up), ""
    if kind == 1:
        return "GITHUB_TOKEN=", "ghp_" + _token(r, 36), ""
    if kind == 2:
        return "slack: ", f"xoxb-{_token(r, 12, string.digits)}-{_token(r, 24)}", ""
    if kind == 3:
        return "stripe.api_key = '", "sk_live_" + _token(r, 24), "'"
    if kind == 4:
        return "key=", "AIza" + _token(r, 35, string.ascii_letters + string.digits + "-_"), ""
    if kind == 5:
        return "OPENAI_API_KEY=", "sk-proj-" + _token(r, 48), ""
    if kind == 6:
        return "HF_TOKEN=", "hf_" + _token(r, 34), ""
    if kind == 7:
        return "Authorization: Bearer ", f"eyJhbGciOiJIUzI1NiJ9.eyJ{_token(r, 30)}.{_token(r, 43)}", ""
    if kind == 8:
        return 'password = "', _token(r, 14, string.ascii_letters + string.digits + "!#$%&*"), '"'
    if kind == 9:
        return "postgres://admin:", _token(r, 12) + "Q7!", "@db.internal:5432/app"
    body = "\n".join(_token(r, 64, string.ascii_letters + string.digits + "+/") for _ in range(3))
    return "", f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----", ""


def _negative(r: random.Random) -> str:
    d = lambda n: "".join(r.choice(string.digits) for _ in range(n))  # noqa: E731
    return r.choice([
        f"version {r.randint(0, 9)}.{r.randint(0, 20)}.{r.randint(0, 30)}", f"released on 20{d(2)}-0{r.randint(1, 9)}-1{r.randint(0, 9)}",
        f"at 1{r.randint(0, 9)}:{r.randint(10, 59)}:{r.randint(10, 59)}", f"sha1 {_token(r, 40, '0123456789abcdef')}",
        f"uuid {_token(r, 8, '0123456789abcdef')}-{_token(r, 4, '0123456789abcdef')}-4{_token(r, 3, '0123456789abcdef')}-"
        f"a{_token(r, 3, '0123456789abcdef')}-{_token(r, 12, '0123456789abcdef')}",
        f"host 192.168.{r.randint(0, 255)}.{r.randint(1, 254)}", "bind 127.0.0.1:8080", f"subnet 10.{r.randint(0, 255)}.0.0/16",
        f"card 4111 1111 1111 111{r.choice('02345678')} (test, bad checksum)", f"IBAN {_iban(r, valid=False)} (typo)",
        f"order #{d(3)}-{d(3)}-{d(3)}", f"x = {d(13)}", f"pi = 3.{d(12)}", f"ISBN 978-{d(1)}-{d(2)}-{d(6)}-{d(1)}",
        "password = \"your_password_here\"", "token = get_token(request)", "api_key = os.environ['API_KEY']",
        f"color #{_token(r, 6, '0123456789abcdef')}", f"score {r.randint(0, 9)}-{r.randint(0, 9)}",
        f"coords {d(2)}.{d(4)}, -{d(1)}.{d(4)}", "@property\ndef name(self):", "user@localhost", f"port {d(4)}",
        f"total = {d(3)} * {d(4)} + {d(2)}", f"slice a[1:{r.randint(2, 9)}:2]",
    ])


_PROSE = ["Please contact {} for details.", "You can reach me at {} any time.", "Forwarded by {} yesterday.",
          "Our records show {} on file.", "Note: {}", "See the ticket, {} was mentioned."]
_CODE = ["# contact: {}\n", "    value = '{}'\n", "log.info(\"got %s\", \"{}\")\n", "// {}\n", "    # {}\n"]
_MAKERS = {"email": _email, "phone": _phone, "ip_address": _ip, "credit_card": _card, "iban": lambda r: _iban(r)}


def generate(n_docs: int = 500, seed: int = 0, per_doc: int = 6) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """[(text, [(start, end, type), ...]), ...]"""
    r = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts: list[str] = []
        labels = []
        pos = 0
        for _ in range(per_doc):
            template = r.choice(_PROSE + _CODE)
            if r.random() < 0.35:
                filler = _negative(r)
                piece = template.format(filler) + " "
                parts.append(piece)
                pos += len(piece)
                continue
            kind = r.choice(TYPES)
            before, value, after = _secret(r) if kind == "secret" else ("", _MAKERS[kind](r), "")
            head, tail = template.split("{}")
            text = head + before
            labels.append((pos + len(text), pos + len(text) + len(value), kind))
            piece = text + value + after + tail + " "
            parts.append(piece)
            pos += len(piece)
        docs.append(("".join(parts), labels))
    return docs


def evaluate(n_docs: int = 500, seed: int = 0, cfg: PIIConfig | None = None) -> dict:
    """Precision and recall per type and overall (micro-averaged)."""
    tp, fp, fn = Counter(), Counter(), Counter()
    false_positives: list[str] = []
    for text, labels in generate(n_docs, seed):
        found = detect(text, cfg)
        matched = set()
        for s in found:
            hit = next((i for i, (a, b, t) in enumerate(labels) if t == s.type and s.start < b and a < s.end), None)
            if hit is None:
                fp[s.type] += 1
                if len(false_positives) < 20:
                    false_positives.append(f"{s.type}: {s.text!r}")
            elif hit not in matched:
                matched.add(hit)
                tp[s.type] += 1
        for i, (_, _, t) in enumerate(labels):
            if i not in matched:
                fn[t] += 1

    def pr(t, f_p, f_n):
        return {"precision": t / (t + f_p) if t + f_p else 1.0, "recall": t / (t + f_n) if t + f_n else 1.0,
                "support": t + f_n}
    per_type = {k: pr(tp[k], fp[k], fn[k]) for k in TYPES}
    total = pr(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    return {"documents": n_docs, "seed": seed, "overall": total, "per_type": per_type,
            "false_positive_examples": false_positives}
