"""PII detection on text lmforge did not write: stdlib prose and code with faker values inserted,
scored by exact spans, with Presidio's pattern recognisers as a second opinion.

Floors are set below figures measured on these exact documents (seed 3, 150 windows, 450 values;
see the comments), so a regression in a detector regex or validator shows up as a failed floor."""
import sys

import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.pii_eval import (RealDoc, agreement, build_docs, insert_values, lmforge_detector,
                                   presidio_detector, score, score_doc)
from lmforge.errors import LmforgeError

N_DOCS, SEED = 150, 3


@pytest.fixture(scope="module")
def docs():
    return build_docs(N_DOCS, SEED, prescan=[lmforge_detector()])


@pytest.fixture(scope="module")
def ours(docs):
    return score(docs, lmforge_detector())


def test_insertion_leaves_the_base_text_intact(docs):
    assert len(docs) == N_DOCS and sum(len(d.inserted) for d in docs) == 3 * N_DOCS
    for doc in docs:
        rebuilt, pos = [], 0
        for x in doc.inserted:
            a, b = x.added
            assert doc.text[x.start:x.end] == x.value
            # one separating space on exactly one side, then the untouched base text
            assert doc.text[a:b] in (x.value + " ", " " + x.value)
            rebuilt.append(doc.text[pos:a])
            pos = b
        rebuilt.append(doc.text[pos:])
        assert "".join(rebuilt) == doc.base


def test_values_never_split_a_word():
    r = __import__("random").Random(0)
    base = "alpha beta.gamma delta, epsilon (zeta) eta."
    for _ in range(50):
        text, [x] = insert_values(base, [("email", "a.b@example.org", "en_US")], r)
        before, after = text[x.start - 1] if x.start else " ", text[x.end] if x.end < len(text) else " "
        assert before.isspace() and (after.isspace() or after in ".,;:)")
        assert not (after == "." and text[x.end + 1:x.end + 2].isalnum())  # not 'x@y.org.gamma'


def _doc_with(values):
    base = "Some prose here, then a value and more words after it. End of the text."
    text, inserted = insert_values(base, values, __import__("random").Random(1))
    return RealDoc("test", base, text, inserted)


def test_scoring_is_exact_span():
    doc = _doc_with([("email", "jane.doe@example.org", "en_US"), ("iban", "DE44500105175407324931", "de_DE")])
    exact = {(x.start, x.end, x.type) for x in doc.inserted}
    assert sum(score_doc(doc, exact)["tp"].values()) == 2
    e, i = sorted(doc.inserted, key=lambda x: x.type)
    for off_by_one in [(e.start + 1, e.end), (e.start, e.end - 1), (e.start - 1, e.end), (e.start, e.end + 1)]:
        v = score_doc(doc, {(i.start, i.end, "iban"), (*off_by_one, "email")})
        assert v["tp"] == {"iban": 1} and v["fn"] == {"email": 1} and v["partial"] == {"email": 1}
        assert v["fp"] == {"email": 1}
    wrong_type = score_doc(doc, {(e.start, e.end, "phone"), (i.start, i.end, "iban")})
    assert wrong_type["fn"] == {"email": 1} and wrong_type["fp"] == {"phone": 1}


def test_preexisting_emails_are_counted_apart():
    base = "Written by Guido van Rossum <guido@python.org>; see the docs for more words here."
    text, inserted = insert_values(base, [("ip_address", "8.8.4.4", "en_US")], __import__("random").Random(2),
                                   taken=[(base.index("guido@"), base.index(">"))])
    doc = RealDoc("test", base, text, inserted)
    v = score_doc(doc, lmforge_detector()(text))
    assert v["preexisting_emails"] == 1 and v["tp"] == {"ip_address": 1} and not v["fp"]


# measured on these documents (seed 3, 150 windows): precision 1.000 for every type; recall e-mail,
# IBAN and IP 1.000 (95/101/95 values), phone 0.658 (52/79: bare national numbers and faker's
# odd formats are missed on purpose), credit card 0.513 (41/80: bare 12-14 and 19-digit numbers
# and faker's 1800/2131/0604 prefixes are not accepted without separators)
FLOORS = {"email": (0.97, 0.97), "iban": (0.97, 0.97), "ip_address": (0.97, 0.97),
          "credit_card": (0.97, 0.45), "phone": (0.97, 0.58)}


def test_lmforge_precision_and_recall_on_real_text(ours):
    for kind, (p, r) in FLOORS.items():
        got = ours["per_type"][kind]
        assert got["support"] >= 60, kind
        assert got["precision"] >= p and got["recall"] >= r, (kind, got, ours["fn_examples"], ours["fp_examples"])


def test_presidio_on_the_same_text_and_agreement(docs, ours):
    theirs = score(docs, presidio_detector())
    agree = agreement(docs, ours["_hits"], theirs["_hits"])
    # both find (nearly) every e-mail and IBAN exactly, so they agree there
    for kind in ("email", "iban"):
        assert theirs["per_type"][kind]["recall"] >= 0.95, (kind, theirs["per_type"][kind])
        assert agree[kind]["agreement"] >= 0.95, (kind, agree[kind])
    # Presidio's phone matcher (libphonenumber) knows national formats lmforge leaves alone on purpose
    assert theirs["per_type"]["phone"]["recall"] > ours["per_type"]["phone"]["recall"]
    assert sum(agree["phone"][k] for k in ("both", "lmforge_only", "presidio_only", "neither")) == \
        ours["per_type"]["phone"]["support"]


def test_missing_optional_packages_are_clear_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "faker", None)
    with pytest.raises(LmforgeError, match="faker"):
        build_docs(2, 0)
    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)
    with pytest.raises(LmforgeError, match="presidio"):
        presidio_detector()


def test_cli_real_text(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["data", "pii-bench", "--real", "--docs", "4", "--no-presidio", "--faker-locales",
                            "de_DE,fr_FR"])
    assert r.exit_code == 0, r.output
    assert "lmforge" in r.output and "iban" in r.output
    r = runner.invoke(app, ["data", "pii-bench", "--real", "--docs", "2", "--faker-locales", "xx_XX", "--no-presidio"])
    assert isinstance(r.exception, LmforgeError) and "xx_XX" in str(r.exception)
