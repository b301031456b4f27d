"""A thin wrapper around a Hugging Face `tokenizers.Tokenizer` with what lmforge needs:
special-token ids, lossless raw-byte encoding, per-token byte lengths, chat templates."""
from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from lmforge.errors import LmforgeError
from lmforge.tokenizer.chat import CHATML, render_chat, render_chat_parts

EOS, BOS, PAD = "<|endoftext|>", "<|startoftext|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, BOS, PAD, IM_START, IM_END]
META_FILE = "lmforge_tokenizer.json"


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


class Tokenizer:
    def __init__(self, hf: HFTokenizer, chat_template: str | None = CHATML, eos: str | None = EOS,
                 bos: str | None = None):
        self.hf = hf
        self.chat_template = chat_template
        self.eos_token, self.bos_token = eos, bos
        self.eos_id = hf.token_to_id(eos) if eos else None
        self.bos_id = hf.token_to_id(bos) if bos else None

    # --- encoding ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def encode_text(self, text: str) -> list[int]:
        """Untrusted text (a user's message or prompt): special-token strings in it are encoded as
        the characters they are, never as control tokens."""
        return self._text_only.encode(text, add_special_tokens=False).ids

    @cached_property
    def _text_only(self) -> HFTokenizer:
        # A copy, so that the shared tokenizer's behaviour never changes under another thread.
        hf = HFTokenizer.from_str(self.hf.to_str())
        hf.encode_special_tokens = True
        return hf

    @cached_property
    def special_tokens(self) -> list[str]:
        return [t.content for t in self.hf.get_added_tokens_decoder().values() if t.special]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def byte_level(self) -> bool:
        return isinstance(self.hf.pre_tokenizer, pre_tokenizers.ByteLevel)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Lossless for any bytes (byte-level BPE): UTF-8 runs are encoded normally, each invalid
        byte becomes its single-byte token."""
        if not self.byte_level:
            raise LmforgeError("raw-byte encoding needs a byte-level BPE tokenizer")
        ids, start = [], 0
        while start < len(data):
            try:
                ids += self.encode(data[start:].decode("utf-8"))
                break
            except UnicodeDecodeError as e:
                ids += self.encode(data[start:start + e.start].decode("utf-8"))
                bad = start + e.start
                ids += [self.hf.token_to_id(BYTE_TO_CHAR[b]) for b in data[bad:start + e.end]]
                start += e.end
        return ids

    def decode_bytes(self, ids) -> bytes:
        """Exact bytes of a byte-level token sequence (special tokens as their UTF-8 text)."""
        table = self.token_bytes_table
        return b"".join(table[i] for i in ids)

    @cached_property
    def token_bytes_table(self) -> list[bytes]:
        specials = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        out = []
        for i in range(self.vocab_size):
            tok = self.hf.id_to_token(i) or ""
            if tok in specials or not self.byte_level:
                out.append(self.decode([i]).encode("utf-8"))
            else:
                out.append(bytes(CHAR_TO_BYTE[c] for c in tok))
        return out

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes each token stands for; 0 for special tokens (they are not text). Used for bpb."""
        specials = {i for i in self.hf.get_added_tokens_decoder()}
        return np.array([0 if i in specials else len(b) for i, b in enumerate(self.token_bytes_table)],
                        dtype=np.int64)

    # --- chat ------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise LmforgeError("this tokenizer has no chat template")
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat: only the template inserts special tokens; message text is text."""
        if not self.chat_template:
            raise LmforgeError("this tokenizer has no chat template")
        parts = render_chat_parts(self.chat_template, messages, self.special_tokens, add_generation_prompt,
                                  bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        ids: list[int] = []
        for text, control in parts:
            ids += [self.hf.token_to_id(text)] if control else self.encode_text(text)
        return ids

    def stop_ids(self) -> set[int]:
        """Token ids that end a generation: EOS and the chat end-of-turn token when present."""
        ids = {self.eos_id, self.hf.token_to_id(IM_END)}
        return {i for i in ids if i is not None}

    # --- files -----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write a tokenizer folder atomically (the lmforge.outputs rule decides what it may replace)."""
        from lmforge.outputs import commit_output_dir, new_output_dir
        tmp = new_output_dir(directory, "tokenizer", overwrite)
        self.write_files(tmp)
        commit_output_dir(tmp, directory, "tokenizer")
        return Path(directory) / "tokenizer.json"

    def write_files(self, d: Path) -> None:
        """tokenizer.json plus the configs lmforge and transformers' AutoTokenizer read, into folder d."""
        self.hf.save(str(d / "tokenizer.json"))
        meta = {"chat_template": self.chat_template, "eos_token": self.eos_token, "bos_token": self.bos_token}
        (d / META_FILE).write_text(json.dumps(meta, indent=2))
        pad = PAD if self.hf.token_to_id(PAD) is not None else self.eos_token
        specials = {k: v for k, v in (("eos_token", self.eos_token), ("bos_token", self.bos_token),
                                      ("pad_token", pad)) if v}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "add_bos_token": False, "add_eos_token": False, "model_max_length": 1 << 30, **specials}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        (d / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))


def load_tokenizer(ref: str | os.PathLike) -> Tokenizer:
    """From a tokenizer.json, or a directory with tokenizer.json (+ lmforge or HF config), or a .gguf."""
    path = Path(ref)
    if path.suffix == ".gguf":
        from lmforge.tokenizer.gguf import read_gguf_tokenizer
        hf, options = read_gguf_tokenizer(path)
        return Tokenizer(hf, **options)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise LmforgeError(f"no tokenizer.json at {ref}")
    try:
        hf = HFTokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises plain Exception for malformed files
        raise LmforgeError(f"{file}: corrupt tokenizer ({e})") from e
    directory = file.parent
    if (directory / META_FILE).exists():
        meta = json.loads((directory / META_FILE).read_text())
        return Tokenizer(hf, meta.get("chat_template"), meta.get("eos_token"), meta.get("bos_token"))
    if (directory / "tokenizer_config.json").exists():  # a Hugging Face model directory
        conf = json.loads((directory / "tokenizer_config.json").read_text())
        token = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
        return Tokenizer(hf, conf.get("chat_template"), token(conf.get("eos_token")), token(conf.get("bos_token")))
    return Tokenizer(hf, CHATML if hf.token_to_id(IM_START) is not None else None,
                     EOS if hf.token_to_id(EOS) is not None else None)
