import pytest

from lmforge.data.pii import PIIConfig, detect, redact
from lmforge.data.pii_bench import evaluate, generate
from lmforge.data.pii_validators import card_network, iban_ok, luhn_ok


def kinds(text, **cfg):
    return [(s.type, s.text) for s in detect(text, PIIConfig(**cfg))]


def test_validators_on_published_examples():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert card_network("4111111111111111") == "visa" and card_network("378282246310005") == "amex"
    assert card_network("5555555555554444") == "mastercard" and card_network("1234567812345670") is None
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and iban_ok("DE89370400440532013000")
    assert not iban_ok("GB83 WEST 1234 5698 7654 32") and not iban_ok("DE8937040044053201300")


@pytest.mark.parametrize("text, expected", [
    ("mail guido@python.org now", [("email", "guido@python.org")]),
    ("From: Páolo <főo@bar.com>", [("email", "főo@bar.com")]),
    ("write to jane [at] example [dot] org", [("email", "jane [at] example [dot] org")]),
    ("call (415) 555-2671 or +44 20 7946 0958", [("phone", "(415) 555-2671"), ("phone", "+44 20 7946 0958")]),
    ("Tel: +14155552671", [("phone", "+14155552671")]),
    ("server 8.8.8.8 and 2a00:1450:4001:81b::200e", [("ip_address", "8.8.8.8"), ("ip_address", "2a00:1450:4001:81b::200e")]),
    ("card 4111 1111 1111 1111 exp", [("credit_card", "4111 1111 1111 1111")]),
    ("IBAN GB82 WEST 1234 5698 7654 32.", [("iban", "GB82 WEST 1234 5698 7654 32")]),
    ("key AKIAIOSFODNN7EXAMPLE", [("secret", "AKIAIOSFODNN7EXAMPLE")]),
    ('db_password = "Zq8#kLm2$vPx9"', [("secret", "Zq8#kLm2$vPx9")]),
    ("postgres://admin:hunter2Q7@db.internal/app", [("secret", "hunter2Q7")]),
    ("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----", [("secret", "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----")]),
])
def test_detects_each_type(text, expected):
    assert kinds(text) == expected


@pytest.mark.parametrize("text", [
    "version 3.11.7 released 2023-10-02 at 12:30:45",
    "bind 127.0.0.1:8080, subnet 10.0.0.0/8 and host 192.168.1.20",
    "sha1 da39a3ee5e6b4b0d3255bfef95601890afd80709 uuid 123e4567-e89b-12d3-a456-426614174000",
    "test card 4111 1111 1111 1112 (bad checksum), x = 1234567890123, total = 555 * 1234",
    "IBAN GB83 WEST 1234 5698 7654 32 has a typo",
    'password = "your_password_here"; token = get_token(request); key = os.environ["API_KEY"]',
    "@property\ndef name(self): return a@b.T",
    "x = +4294967296",
])
def test_hard_negatives_are_left_alone(text):
    assert kinds(text) == []


def test_redaction_uses_typed_placeholders_and_counts():
    text, counts = redact("Ask bob@example.com or 8.8.4.4; card 378282246310005.")
    assert text == "Ask <EMAIL> or <IP_ADDRESS>; card <CREDIT_CARD>."
    assert counts == {"email": 1, "ip_address": 1, "credit_card": 1}
    custom, _ = redact("bob@example.com", PIIConfig(placeholder="[{TYPE}]"))
    assert custom == "[EMAIL]"


def test_types_and_private_ips_are_configurable():
    assert kinds("bob@example.com 8.8.8.8", types=["ip_address"]) == [("ip_address", "8.8.8.8")]
    assert kinds("host 10.1.2.3", skip_private_ips=False) == [("ip_address", "10.1.2.3")]


def test_benchmark_labels_line_up_with_text():
    for text, labels in generate(50, seed=5):
        for start, end, kind in labels:
            assert text[start:end] and not text[start:end].startswith(" ")


def test_pii_benchmark_precision_and_recall():
    result = evaluate(n_docs=1000, seed=0)
    print("\nPII benchmark (1000 synthetic documents):")
    for name, r in [*result["per_type"].items(), ("all", result["overall"])]:
        print(f"  {name:12s} precision {r['precision']:.3f} recall {r['recall']:.3f} (n={r['support']})")
    assert result["overall"]["support"] > 3000
    assert result["overall"]["recall"] >= 0.95
    assert result["overall"]["precision"] >= 0.95
    assert all(r["recall"] >= 0.9 for r in result["per_type"].values())
