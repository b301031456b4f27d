"""The byte-level BPE tokenizer stored in a GGUF (llama.cpp) file: vocabulary, merges, special
tokens, eos/bos and chat template. The weights are read by lmforge.model.gguf."""
from __future__ import annotations

import os

from lmforge.errors import LmforgeError
from lmforge.gguf_file import gguf_field, open_gguf

# Pre-tokenizer split patterns, by tokenizer.ggml.pre (the regex llama.cpp uses for each).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx")}


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM's own tokenizer.json: digits one by one, then GPT-2 byte-level
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return byte_level  # "gpt2", "default" and unknown: GPT-2's split


def read_gguf_tokenizer(path: str | os.PathLike):
    """The byte-level BPE tokenizer stored in a GGUF file, and the keyword arguments of
    `lmforge.tokenizer.Tokenizer` (chat_template, eos, bos): `load_tokenizer` builds the Tokenizer."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    reader = open_gguf(path)
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise LmforgeError(f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(gguf_field(reader, "tokenizer.ggml.tokens") or [])
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges") or []]
    types = list(gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    if not tokens or not merges:
        raise LmforgeError(f"{path}: no tokenizer vocabulary or merges in the file")
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = _pre_tokenizer(gguf_field(reader, "tokenizer.ggml.pre"))
    hf.decoder = decoders.ByteLevel()
    # Token types: 3 = control (special, never produced by splitting text), 4 = user-defined.
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind in zip(tokens, types) if kind == 3])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == 4])

    def token(key):
        i = gguf_field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return hf, {"chat_template": gguf_field(reader, "tokenizer.chat_template"),
                "eos": token("tokenizer.ggml.eos_token_id"), "bos": token("tokenizer.ggml.bos_token_id")}
