"""PII detection scored on text lmforge did not write: standard-library docstrings, comments and
source (the running interpreter's), with PII values from `faker` (several locales) inserted at
seeded random word boundaries, scored by EXACT span match; Presidio's pattern recognisers are run
on the same text as a second opinion.

Counting rules (the same for both detectors):
- a detection is a true positive only if (start, end, type) equals an inserted span;
- any other detection is a false positive, including partial overlaps with an inserted value and
  detections in the untouched base text, except e-mail-shaped detections in the base text: the
  stdlib holds real author addresses, so those are counted apart as `preexisting_emails`;
- `partial` counts inserted spans that a same-type detection overlaps but does not equal (each
  is also a miss), to tell boundary errors from values not found at all.

Caveat: the values are real-world formats only as far as faker's locale providers go, and the
insertion points are synthetic (at word boundaries, never inside a word).
"""
from __future__ import annotations

import ast
import io
import ipaddress
import random
import tokenize
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from lmforge.data.pii import PIIConfig, detect
from lmforge.errors import LmforgeError

DEFAULT_LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "it_IT", "ja_JP")
INSERTED_TYPES = ("email", "phone", "ip_address", "credit_card", "iban")
_PRESIDIO_TYPES = {"EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "IP_ADDRESS": "ip_address",
                   "CREDIT_CARD": "credit_card", "IBAN_CODE": "iban"}
_PUNCT_AFTER = ".,;:)"
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")


@dataclass(frozen=True)
class Insertion:
    start: int  # value's span in the modified text
    end: int
    type: str
    value: str
    locale: str
    added: tuple[int, int]  # everything inserted (value plus one separating space)


@dataclass
class RealDoc:
    source: str  # "stdlib:PATH#prose" or "stdlib:PATH#code"
    base: str
    text: str
    inserted: list[Insertion] = field(default_factory=list)


def _faker(locale: str):
    try:
        from faker import Faker
    except ImportError:
        raise LmforgeError("the real-text PII evaluation needs faker: pip install faker "
                           "(or lmforge[dev])") from None
    try:
        return Faker(locale)
    except AttributeError:
        raise LmforgeError(f"faker has no locale {locale!r}") from None


def prose_of(source: str) -> str:
    """Docstrings (via ast) and comments (via tokenize) of a Python source, in source order."""
    items: list[tuple[int, str]] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                items.append((node.body[0].lineno, doc))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if text and not text.startswith("!"):
                items.append((tok.start[0], text))
    return "\n".join(text for _, text in sorted(items, key=lambda it: it[0]))


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[tuple[str, str], ...]:
    from lmforge.corpus.stdlib import stdlib_documents
    return tuple((d.id, d.text) for d in stdlib_documents())


def _window(text: str, r: random.Random, size: int) -> str:
    """About `size` characters of text, from a random line start to a line end."""
    if len(text) <= size:
        return text
    start = text.rfind("\n", 0, r.randrange(len(text) - size)) + 1
    end = text.rfind("\n", start, start + size)
    return text[start:end if end > start else start + size]


def base_texts(n_docs: int, seed: int, size: int = 1200) -> list[tuple[str, str]]:
    """[(source, text)]: windows of stdlib prose (docstrings + comments) or source code, half each."""
    r = random.Random(seed)
    files = list(_stdlib_files())
    r.shuffle(files)
    out: list[tuple[str, str]] = []
    i = 0
    while len(out) < n_docs and i < 50 * len(files):
        name, source = files[i % len(files)]
        i += 1
        kind = "prose" if r.random() < 0.5 else "code"
        if kind == "prose":
            try:
                text = prose_of(source)
            except (SyntaxError, tokenize.TokenError, ValueError):
                continue  # a few stdlib test files are deliberately broken
        else:
            text = source
        text = _window(text, r, size)
        if len(text.split()) >= 20:
            out.append((f"{name}#{kind}", text))
    return out


def faker_value(kind: str, fake, r: random.Random) -> str:
    """A PII value of `kind` in the format faker's locale provider produces."""
    if kind == "email":
        return r.choice([fake.email, fake.free_email, fake.company_email])()
    if kind == "phone":
        return fake.phone_number()
    if kind == "credit_card":
        return fake.credit_card_number()
    if kind == "iban":
        return fake.iban()
    if r.random() < 0.5:
        return fake.ipv4_public()
    while True:  # faker draws from all 128 bits, mostly reserved space; keep IANA's global unicast
        ip = fake.ipv6()
        if ipaddress.ip_address(ip) in _GLOBAL_UNICAST:
            return ip


def _free_positions(text: str, taken: list[tuple[int, int]]) -> list[tuple[int, str]]:
    """(position, how) where a value can go: 'before' a word after whitespace, or 'after' a word
    just before punctuation that ends it (`word.` but not `os.path`); never inside an existing
    detection."""
    out = []
    for i in range(len(text)):
        if i > 0 and text[i - 1].isspace() and not text[i].isspace():
            how = "before"
        elif (0 < i and text[i] in _PUNCT_AFTER and text[i - 1].isalnum()
              and (i + 1 == len(text) or text[i + 1].isspace())):
            how = "after"
        else:
            continue
        if not any(a < i < b for a, b in taken):
            out.append((i, how))
    return out


def insert_values(base: str, values: list[tuple[str, str, str]], r: random.Random,
                  taken: list[tuple[int, int]] = ()) -> tuple[str, list[Insertion]]:
    """Insert (type, value, locale) triples at distinct random free positions of base: 'value '
    before a word or ' value' before punctuation. The base text is otherwise untouched."""
    free = _free_positions(base, list(taken))
    chosen = sorted(r.sample(free, min(len(values), len(free))))
    parts, inserted, pos, shift = [], [], 0, 0
    for (at, how), (kind, value, locale) in zip(chosen, values):
        parts.append(base[pos:at])
        chunk = value + " " if how == "before" else " " + value
        start = at + shift + (0 if how == "before" else 1)
        inserted.append(Insertion(start, start + len(value), kind, value, locale, (at + shift, at + shift + len(chunk))))
        parts.append(chunk)
        pos, shift = at, shift + len(chunk)
    parts.append(base[pos:])
    return "".join(parts), inserted


def build_docs(n_docs: int = 1000, seed: int = 0, locales=DEFAULT_LOCALES, per_doc: int = 3,
               prescan=()) -> list[RealDoc]:
    """Base windows with `per_doc` faker values each, type and locale drawn uniformly. `prescan`
    detectors (text -> spans) mark base-text detections, inside which nothing is inserted."""
    if not locales:
        raise LmforgeError("give at least one faker locale")
    fakers = {loc: _faker(loc) for loc in locales}
    for i, loc in enumerate(locales):
        fakers[loc].seed_instance(seed * 1000 + i)
    r = random.Random(seed)
    docs = []
    for source, base in base_texts(n_docs, seed):
        values = []
        for _ in range(per_doc):
            kind, loc = r.choice(INSERTED_TYPES), r.choice(locales)
            values.append((kind, faker_value(kind, fakers[loc], r), loc))
        taken = [(s, e) for d in prescan for s, e, _ in d(base)]
        text, inserted = insert_values(base, values, r, taken)
        docs.append(RealDoc(source, base, text, inserted))
    return docs


def lmforge_detector(cfg: PIIConfig | None = None):
    types = list(INSERTED_TYPES)
    cfg = cfg or PIIConfig(types=types)
    return lambda text: {(s.start, s.end, s.type) for s in detect(text, cfg)}


def presidio_detector(locales=DEFAULT_LOCALES):
    """Presidio's e-mail, phone, IP, credit-card and IBAN pattern recognisers, instantiated
    directly (no NLP engine, no spaCy model), merged by Presidio's own duplicate removal as its
    AnalyzerEngine does. Phone regions: Presidio's defaults plus the locales' countries.
    E-mail validation uses tldextract's bundled suffix list (its default fetches one online)."""
    try:
        import tldextract
        from presidio_analyzer import EntityRecognizer
        from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, EmailRecognizer,
                                                              IbanRecognizer, IpRecognizer, PhoneRecognizer)
    except ImportError:
        raise LmforgeError("the Presidio comparison needs presidio-analyzer: pip install presidio-analyzer "
                           "(or lmforge[dev])") from None
    offline_tld = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str):
            return offline_tld(pattern_text).fqdn != ""

    regions = tuple(dict.fromkeys([*PhoneRecognizer.DEFAULT_SUPPORTED_REGIONS,
                                   *(loc.split("_")[-1].upper() for loc in locales)]))
    recognizers = [OfflineEmailRecognizer(), PhoneRecognizer(supported_regions=regions), IpRecognizer(),
                   CreditCardRecognizer(), IbanRecognizer()]

    def find(text: str):
        results = []
        for rec in recognizers:
            results += rec.analyze(text, rec.supported_entities, None)
        return {(x.start, x.end, _PRESIDIO_TYPES[x.entity_type])
                for x in EntityRecognizer.remove_duplicates(results)}
    return find


def score_doc(doc: RealDoc, found: set[tuple[int, int, str]]) -> dict:
    """Exact-span verdicts for one document: tp/fn/partial per inserted span, fp per detection,
    and the e-mail detections that were already in the base text."""
    labels = {(x.start, x.end, x.type) for x in doc.inserted}
    out = {"tp": Counter(), "fn": Counter(), "fp": Counter(), "partial": Counter(), "preexisting_emails": 0,
           "hits": {}, "fp_examples": [], "fn_examples": []}
    for x in doc.inserted:
        hit = (x.start, x.end, x.type) in found
        out["hits"][(x.start, x.end, x.type)] = hit
        if hit:
            out["tp"][x.type] += 1
        else:
            out["fn"][x.type] += 1
            out["fn_examples"].append(f"{x.type} [{x.locale}]: {x.value!r}")
            if any(t == x.type and s < x.end and x.start < e for s, e, t in found):
                out["partial"][x.type] += 1
    for s, e, t in sorted(found):
        if (s, e, t) in labels:
            continue
        in_base = not any(a < e and s < b for a, b in (x.added for x in doc.inserted))
        if in_base and t == "email":
            out["preexisting_emails"] += 1
        else:
            out["fp"][t] += 1
            out["fp_examples"].append(f"{t}: {doc.text[s:e]!r}{'' if in_base else ' (overlaps an insertion)'}")
    return out


def _rates(tp: int, fp: int, fn: int, partial: int) -> dict:
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0,
            "tp": tp, "fp": fp, "fn": fn, "partial": partial, "support": tp + fn}


def score(docs: list[RealDoc], detector, examples: int = 15) -> dict:
    tp, fp, fn, partial = Counter(), Counter(), Counter(), Counter()
    pre, base_text, fps, fns, hits = 0, Counter(), [], [], []
    for doc in docs:
        d = score_doc(doc, detector(doc.text))
        tp += d["tp"]
        fp += d["fp"]
        fn += d["fn"]
        partial += d["partial"]
        pre += d["preexisting_emails"]
        fps += d["fp_examples"]
        fns += d["fn_examples"]
        hits.append(d["hits"])
        base_text.update(t for _, _, t in detector(doc.base))
    per_type = {t: _rates(tp[t], fp[t], fn[t], partial[t]) for t in INSERTED_TYPES}
    overall = _rates(*(sum(c.values()) for c in (tp, fp, fn, partial)))
    return {"per_type": per_type, "overall": overall, "preexisting_emails": pre,
            "base_text_detections": dict(base_text), "fp_examples": fps[:examples], "fn_examples": fns[:examples],
            "_hits": hits}


def agreement(docs: list[RealDoc], hits_a: list[dict], hits_b: list[dict]) -> dict:
    """Per type, over the inserted spans: found exactly by both, by one only, by neither."""
    out = {}
    for kind in INSERTED_TYPES:
        c = Counter()
        for doc, a, b in zip(docs, hits_a, hits_b):
            for x in doc.inserted:
                if x.type == kind:
                    key = (x.start, x.end, x.type)
                    c[{(True, True): "both", (True, False): "lmforge_only", (False, True): "presidio_only",
                       (False, False): "neither"}[(a[key], b[key])]] += 1
        n = sum(c.values())
        out[kind] = {**{k: c[k] for k in ("both", "lmforge_only", "presidio_only", "neither")},
                     "agreement": (c["both"] + c["neither"]) / n if n else 1.0}
    return out


def evaluate(n_docs: int = 1000, seed: int = 0, locales=DEFAULT_LOCALES, per_doc: int = 3,
             presidio: bool = True, cfg: PIIConfig | None = None) -> dict:
    ours = lmforge_detector(cfg)
    theirs = presidio_detector(locales) if presidio else None
    docs = build_docs(n_docs, seed, locales, per_doc, prescan=[ours] + ([theirs] if theirs else []))
    result = {"documents": len(docs), "seed": seed, "locales": list(locales),
              "inserted": sum(len(d.inserted) for d in docs), "base_chars": sum(len(d.base) for d in docs),
              "detectors": {"lmforge": score(docs, ours)}}
    if theirs:
        result["detectors"]["presidio"] = score(docs, theirs)
        result["agreement"] = agreement(docs, result["detectors"]["lmforge"]["_hits"],
                                        result["detectors"]["presidio"]["_hits"])
    for d in result["detectors"].values():
        del d["_hits"]
    return result
