"""A small messy corpus for pipeline tests: prose and code, exact and near duplicates, duplicate
URLs, PII, a toxic rant, low-quality pages and a document quoting an evaluation set."""
from __future__ import annotations

import json
import random

from lmforge.corpus.document import Document
from lmforge.data.planted import plant, random_vocabulary

STOP = ["the", "of", "and", "to", "with", "that", "have", "be", "in", "for"]
EVAL_QUESTION = ("A train leaves the station at nine in the morning travelling at sixty miles per hour and a "
                 "second train follows it two hours later at eighty miles per hour; when does it catch up?")


def prose(rng: random.Random, vocab: list[str], sentences: int = 12) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(vocab) if i % 3 else rng.choice(STOP) for i in range(rng.randint(8, 16))]
        out.append(" ".join(words).capitalize() + ".")
    lines, i = [], 0
    while i < len(out):
        lines.append(" ".join(out[i:i + 3]))
        i += 3
    return "\n".join(lines) + "\n"


def code(rng: random.Random, vocab: list[str]) -> str:
    names = rng.sample(vocab, 6)
    body = "\n".join(f"    {a} = {b}({c}, {rng.randint(0, 99)})" for a, b, c in zip(names, names[1:], names[2:]))
    return f"import os\n\n\ndef {names[0]}_{names[1]}(path):\n{body}\n    return {names[0]}\n"


def messy_corpus(seed: int = 0, n_prose: int = 60, n_code: int = 30) -> tuple[list[Document], dict]:
    """(documents, expectations): for exact/near/url, groups of duplicates of which exactly one
    must survive; for quality/toxic/decontam, ids that must be removed."""
    rng = random.Random(seed)
    vocab = random_vocabulary(rng, 3000)
    docs: list[Document] = []
    expect = {"exact": [], "near": [], "url": [], "quality": [], "toxic": [], "decontam": []}
    for i in range(n_prose):
        docs.append(Document(f"web-{i}", prose(rng, vocab), "web", {"url": f"https://site{i}.example.org/page"}))
    for i in range(n_code):
        docs.append(Document(f"code-{i}", code(rng, vocab), "code", {"path": f"pkg/mod{i}.py"}))
    # duplicates of earlier documents
    docs.append(Document("exact-copy", docs[3].text.replace("\n", "\r\n"), "web", {}))  # equal after normalising
    expect["exact"] = ["web-3", "exact-copy"]
    near_base = prose(rng, vocab, 40)
    near_text, _ = plant(near_base, 0.9, "edit", rng, vocab)
    docs.append(Document("near-base", near_base, "web", {}))
    docs.append(Document("near-copy", near_text, "web", {}))
    expect["near"] = ["near-base", "near-copy"]
    docs.append(Document("url-copy", prose(rng, vocab), "web",
                         {"url": "HTTP://WWW.site7.example.org/page/?utm_source=newsletter"}))
    expect["url"] = ["web-7", "url-copy"]
    # PII, toxicity, quality and contamination
    docs.append(Document("pii", prose(rng, vocab) + "Contact jane.doe@example.com or +44 20 7946 0958, "
                         "card 4111 1111 1111 1111.\n", "web", {}))
    docs.append(Document("toxic", "You are an idiot and a moron. Shut up, you pathetic loser.\n"
                         + prose(rng, vocab, 4), "web", {}))
    expect["toxic"].append("toxic")
    docs.append(Document("short", "Click here.", "web", {}))
    docs.append(Document("boilerplate", "\n".join(["Accept all cookies.", "Privacy policy.", "Sign in."] * 30),
                         "web", {}))
    expect["quality"] += ["short", "boilerplate"]
    docs.append(Document("leak", prose(rng, vocab, 4) + EVAL_QUESTION + "\n" + prose(rng, vocab, 4), "web", {}))
    expect["decontam"].append("leak")
    rng.shuffle(docs)
    return docs, expect


def write_eval_set(path) -> str:
    path.write_text(json.dumps({"question": EVAL_QUESTION}) + "\n")
    return str(path)
