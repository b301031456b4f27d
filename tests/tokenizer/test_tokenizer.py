import pytest
from hypothesis import given, settings, strategies as st

from lmforge.errors import LmforgeError
from lmforge.tokenizer import compression_report, load_tokenizer, train_tokenizer
from lmforge.tokenizer.tokenizer import IM_END, IM_START

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n",
    "Le café coûte 3 € — naïve façade, 東京, 🙂 emoji.\n",
    "for i in range(10):\n    print(i * i)\n",
] * 50


@pytest.fixture(scope="module")
def byte_tok():
    return train_tokenizer(CORPUS, kind="byte-bpe", vocab_size=400)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_bpe_roundtrips_any_unicode(byte_tok, text):
    assert byte_tok.decode(byte_tok.encode(text)) == text
    assert byte_tok.decode_bytes(byte_tok.encode(text)) == text.encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_byte_bpe_roundtrips_raw_bytes(byte_tok, data):
    assert byte_tok.decode_bytes(byte_tok.encode_bytes(data)) == data


def test_merges_are_learned(byte_tok):
    ids = byte_tok.encode("def add(a, b):\n    return a + b\n")
    assert len(ids) < len("def add(a, b):\n    return a + b\n") / 2


@pytest.mark.parametrize("kind", ["byte-bpe", "bpe", "unigram"])
def test_save_load_preserves_encodings(tmp_path, kind):
    tok = train_tokenizer(CORPUS, kind=kind, vocab_size=400)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    sample = "def push(self, x):\n    return Stack()  # café 🙂"
    assert again.encode(sample) == tok.encode(sample)
    assert again.decode(again.encode(sample)) == tok.decode(tok.encode(sample))
    assert again.eos_id == tok.eos_id is not None


def test_chat_template_and_specials(byte_tok):
    text = byte_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n"
    ids = byte_tok.encode(text)
    assert byte_tok.hf.token_to_id(IM_START) in ids and byte_tok.hf.token_to_id(IM_END) in ids
    with pytest.raises(LmforgeError):
        byte_tok.apply_chat_template([{"content": "no role"}])


def test_token_byte_lengths_sum_to_text_bytes(byte_tok):
    text = "return café 🙂"
    lengths = byte_tok.token_byte_lengths()
    assert sum(lengths[i] for i in byte_tok.encode(text)) == len(text.encode())
    assert lengths[byte_tok.eos_id] == 0


def test_compression_report(byte_tok):
    r = compression_report(byte_tok, ["def add(a, b):\n    return a + b\n"])
    assert r["bytes"] == 32 and r["bytes_per_token"] == 32 / r["tokens"] and r["bytes_per_token"] > 2


def test_bad_inputs(tmp_path):
    with pytest.raises(LmforgeError, match="unknown tokenizer kind"):
        train_tokenizer(CORPUS, kind="wordpiece")
    with pytest.raises(LmforgeError, match="too small"):
        train_tokenizer(CORPUS, vocab_size=100)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="corrupt"):
        load_tokenizer(tmp_path)
    with pytest.raises(LmforgeError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("kind", ["byte-bpe", "bpe"])
def test_split_digits_never_merges_digits(tmp_path, kind):
    # Sums whose digits would merge first (frequent pairs): with split_digits every digit stays a token,
    # also after a save/load round trip; without it, some number becomes one token.
    texts = [f"What is {a} + {b}? Answer: {a + b}" for a in range(50) for b in range(50)]
    plain = train_tokenizer(texts, kind=kind, vocab_size=400, min_frequency=1)
    split = train_tokenizer(texts, kind=kind, vocab_size=400, min_frequency=1, split_digits=True)
    split.save(tmp_path / "tok")
    line = "What is 37 + 48? Answer: 85"
    for tok in (split, load_tokenizer(tmp_path / "tok")):
        pieces = [tok.decode([i]) for i in tok.encode(line)]
        assert [p for p in pieces if any(c.isdigit() for c in p)] == list("374885")
        assert tok.decode(tok.encode(line)) == line
    assert any(sum(c.isdigit() for c in plain.decode([i])) > 1 for i in plain.encode(line))
