import pytest

from lmforge.data.normalize import NormalizeConfig, normalize_text, normalize_url


def test_text_normalisation_nfc_whitespace_and_invisible_characters():
    cfg = NormalizeConfig()
    raw = "\ufeffCafe\u0301\u00a0bar\r\nline  with   spaces \t\r\n\n\n\n\nzero\u200bwidth\x07\n"
    assert normalize_text(raw, cfg) == "Caf\u00e9 bar\nline with spaces\n\n\nzerowidth\n"


def test_code_keeps_indentation_and_inner_spaces():
    code = "def f():\n    x  =  1   \n\treturn x\n"
    assert normalize_text(code, NormalizeConfig(), is_code=True) == "def f():\n    x  =  1\n\treturn x\n"


@pytest.mark.parametrize("url, expected", [
    ("HTTPS://WWW.Example.COM:443/a/./b/../c/?utm_source=x&b=2&a=1#frag", "https://example.com/a/c?a=1&b=2"),
    ("http://example.com/", "http://example.com"),
    ("http://example.com:8080/x/?fbclid=abc&gclid=1", "http://example.com:8080/x"),
    ("http://ex.com/%7Euser/", "http://ex.com/~user"),
    ("http://user:secret@ex.com/p", "http://ex.com/p"),
    ("http://[2001:db8::1]:80/x", "http://[2001:db8::1]/x"),
    ("mailto:someone@example.com", None),
    ("not a url", None),
])
def test_url_normalisation(url, expected):
    assert normalize_url(url) == expected


def test_url_normalisation_options():
    cfg = NormalizeConfig(strip_www=False, tracking_params=["ref"])
    assert normalize_url("http://www.a.org/?ref=x&utm_source=y", cfg) == "http://www.a.org?utm_source=y"


def test_url_dedup_key_ignores_scheme_by_default():
    from lmforge.data.normalize import url_dedup_key
    assert url_dedup_key("http://www.a.org/x/", NormalizeConfig()) == url_dedup_key("https://a.org/x", NormalizeConfig())
    strict = NormalizeConfig(url_dedup_ignores_scheme=False)
    assert url_dedup_key("http://a.org/x", strict) != url_dedup_key("https://a.org/x", strict)
