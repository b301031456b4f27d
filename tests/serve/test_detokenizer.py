"""Streaming detokenisation: the streamed pieces add up to the full decode, multi-byte characters
are never split, and stop strings are cut out and never leaked while streaming."""
from lmforge.serve.detokenizer import Detokenizer

TEXTS = ["Hello, world! This is a test.", "naïve café 東京タワー 🚀🎉 done", "def f(x):\n    return x ** 2\n"]


def stream(tok, text, stop=None):
    d = Detokenizer(tok, stop)
    pieces = []
    for t in tok.encode(text):
        d.push(t)
        pieces.append(d.take())
        if d.stopped:
            break
    pieces.append(d.take(final=True))
    return pieces, d


def test_stream_adds_up_to_full_decode(smollm_tokenizer):
    for text in TEXTS:
        pieces, _ = stream(smollm_tokenizer, text)
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_stop_string_across_tokens(smollm_tokenizer):
    text = "The answer is forty-two, and that is final."
    pieces, d = stream(smollm_tokenizer, text, stop=["two, and"])
    assert d.stopped and "".join(pieces) == "The answer is forty-"
    assert not any("two" in p for p in pieces)


def test_partial_stop_string_is_held_back_then_released(smollm_tokenizer):
    d = Detokenizer(smollm_tokenizer, ["STOP!"])
    shown = ""
    for t in smollm_tokenizer.encode("wait ST"):
        d.push(t)
        shown += d.take()
    assert shown == "wait "                   # "ST" might start "STOP!"
    for t in smollm_tokenizer.encode("ART"):
        d.push(t)
        shown += d.take()
    assert shown == "wait START" and not d.stopped


def test_generation_ending_inside_a_character_is_flushed(smollm_tokenizer):
    ids = smollm_tokenizer.encode("ok 🚀")
    d = Detokenizer(smollm_tokenizer)
    for t in ids[:-1]:                        # the rocket's last byte never arrives
        d.push(t)
    shown = d.take()
    assert "\ufffd" not in shown
    assert (shown + d.take(final=True)) == smollm_tokenizer.decode(ids[:-1])
