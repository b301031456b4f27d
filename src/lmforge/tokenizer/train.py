"""Train byte-level BPE (default), BPE or Unigram tokenizers with Hugging Face `tokenizers`."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from lmforge.errors import LmforgeError
from lmforge.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer

KINDS = ("byte-bpe", "bpe", "unigram")
# The Rust trainer allocates tables sized by vocab_size up front and aborts the process (no Python
# exception) when that fails, so the range is checked here. The largest real vocabularies are ~256k.
MAX_VOCAB = 1 << 20


def train_tokenizer(texts: Iterable[str], kind: str = "byte-bpe", vocab_size: int = 4096,
                    min_frequency: int = 2, special_tokens: list[str] | None = None,
                    show_progress: bool = False, split_digits: bool = False) -> Tokenizer:
    """`split_digits` keeps every digit its own pre-token (as Llama's and SmolLM's tokenizers do), so no
    merge ever joins digits: numbers are read digit by digit, which helps arithmetic generalise."""
    specials = list(special_tokens or SPECIAL_TOKENS)
    if kind not in KINDS:
        raise LmforgeError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")
    smallest = len(specials) + (1 if kind == "unigram" else 256)   # + <unk>, or + one token per byte
    if not smallest <= vocab_size <= MAX_VOCAB:
        size = "too small" if vocab_size < smallest else "too large"
        raise LmforgeError(f"vocab_size {vocab_size} is {size}: {kind} needs [{smallest}, {MAX_VOCAB}] "
                           f"({'specials + <unk>' if kind == 'unigram' else '256 bytes + special tokens'} at least)")
    if min_frequency < 0:
        raise LmforgeError(f"min_frequency must be >= 0, got {min_frequency}")
    if kind == "byte-bpe":
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress)
    elif kind == "bpe":
        # SentencePiece-style: spaces become '▁', unknown characters fall back to <0xNN> bytes.
        hf = HFTokenizer(models.BPE(byte_fallback=True, unk_token=None))
        hf.normalizer = normalizers.NFC()
        hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="never")])
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=specials + byte_tokens, show_progress=show_progress)
    elif kind == "unigram":
        hf = HFTokenizer(models.Unigram())
        hf.normalizer = normalizers.NFC()
        hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        hf.decoder = decoders.Metaspace(prepend_scheme="never")
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials + ["<unk>"],
                                          unk_token="<unk>", show_progress=show_progress)
    else:
        raise LmforgeError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")
    if split_digits:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), hf.pre_tokenizer])
    try:
        hf.train_from_iterator(_nonempty(texts), trainer=trainer)
    except Exception as e:  # the Rust side raises plain Exception (e.g. a vocabulary the text cannot fill)
        raise LmforgeError(f"tokenizer training failed: {e}") from e
    return Tokenizer(hf)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


def compression_report(tok: Tokenizer, texts: Iterable[str]) -> dict:
    """Bytes per token and tokens per whitespace-separated word on held-out text."""
    n_bytes = n_tokens = n_words = 0
    for t in texts:
        n_bytes += len(t.encode("utf-8"))
        n_words += len(t.split())
        n_tokens += len(tok.encode(t))
    if n_tokens == 0:
        raise LmforgeError("compression report needs non-empty held-out text")
    return {"bytes": n_bytes, "tokens": n_tokens, "words": n_words,
            "bytes_per_token": n_bytes / n_tokens, "tokens_per_word": n_tokens / max(n_words, 1)}
