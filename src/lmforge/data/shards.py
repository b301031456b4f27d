"""Tokenised shards: the contract between the data pipeline and the pretraining loader.

A shard directory holds `index.json` and raw token files `{split}_{n:05d}.bin` (uint16 when
the vocabulary fits, else uint32). Each document's tokens are followed by the EOS token.
Files are written under temporary names and renamed, and `index.json` is written last, so a
reader never sees a half-written shard set. With `resume=True`, a writer picks up the finished
shards of an interrupted run (recorded in `.progress.json` after every shard) and tells its
caller, through `skip(split)`, which of the re-sent documents are already in them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError

INDEX = "index.json"
PROGRESS = ".progress.json"
TOKENIZER_DIR = "tokenizer"  # the tokenizer the shards were written with (write_token_shards)
SHARD_FILES = [INDEX, PROGRESS, TOKENIZER_DIR, "train_*.bin", "val_*.bin"]  # what a shard folder holds


def shard_tokenizer_dir(shard_dir: str | os.PathLike) -> Path | None:
    """The folder of the tokenizer a shard set was written with, when it was saved alongside."""
    d = Path(shard_dir) / TOKENIZER_DIR
    return d if (d / "tokenizer.json").exists() else None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class ShardWriter:
    """Append token sequences per split; shards roll over every `shard_tokens` tokens."""

    def __init__(self, out_dir: str | os.PathLike, vocab_size: int, eos_id: int,
                 shard_tokens: int = 50_000_000, meta: dict | None = None, resume: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size, self.eos_id, self.shard_tokens = vocab_size, eos_id, shard_tokens
        self.meta = meta or {}
        self.splits: dict[str, list[dict]] = {}
        self._buffers: dict[str, list[np.ndarray]] = {}
        self._counts: dict[str, list[int]] = {}  # [tokens, documents] in the open buffer
        self._skip: dict[str, int] = {}  # documents per split already in resumed shards
        if resume:
            self._resume()

    def _settings(self) -> dict:
        return {"dtype": self.dtype.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "shard_tokens": self.shard_tokens, "meta": self.meta}

    def _resume(self) -> None:
        path = self.dir / PROGRESS
        try:
            progress = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if progress.get("settings") != json.loads(json.dumps(self._settings())):
            return  # written with other settings: start over
        for split, shards in progress["splits"].items():
            ok = all((self.dir / e["file"]).exists() and (self.dir / e["file"]).stat().st_size
                     == e["tokens"] * self.dtype.itemsize for e in shards)
            if ok:
                self.splits[split] = shards
                self._skip[split] = sum(e["documents"] for e in shards)

    @property
    def resumed_documents(self) -> int:
        return sum(e["documents"] for shards in self.splits.values() for e in shards)

    def skip(self, split: str) -> bool:
        """True when the next document of `split` is already in a resumed shard (then don't add it)."""
        if self._skip.get(split, 0) > 0:
            self._skip[split] -= 1
            return True
        return False

    def add(self, split: str, tokens) -> None:
        arr = np.asarray(list(tokens) + [self.eos_id], dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise LmforgeError(f"token id out of range for vocab_size {self.vocab_size}")
        self._buffers.setdefault(split, []).append(arr.astype(self.dtype))
        counts = self._counts.setdefault(split, [0, 0])
        counts[0] += arr.size
        counts[1] += 1
        if counts[0] >= self.shard_tokens:
            self._flush(split)

    def _flush(self, split: str) -> None:
        if not self._buffers.get(split):
            return
        shards = self.splits.setdefault(split, [])
        name = f"{split}_{len(shards):05d}.bin"
        tmp = self.dir / f".{name}.tmp"
        np.concatenate(self._buffers[split]).tofile(tmp)
        os.replace(tmp, self.dir / name)
        tokens, docs = self._counts[split]
        shards.append({"file": name, "tokens": tokens, "documents": docs})
        self._buffers[split], self._counts[split] = [], [0, 0]
        tmp = self.dir / f"{PROGRESS}.tmp"
        tmp.write_text(json.dumps({"settings": self._settings(), "splits": self.splits}))
        os.replace(tmp, self.dir / PROGRESS)

    def close(self) -> Path:
        for split in list(self._buffers):
            self._flush(split)
        index = {"version": 1, "dtype": self.dtype.name, "vocab_size": self.vocab_size,
                 "eos_id": self.eos_id, "splits": self.splits, **self.meta}
        tmp = self.dir / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.dir / INDEX)
        (self.dir / PROGRESS).unlink(missing_ok=True)
        return self.dir / INDEX


def read_index(shard_dir: str | os.PathLike) -> dict:
    path = Path(shard_dir) / INDEX
    if not path.exists():
        raise LmforgeError(f"no token shards at {shard_dir} (missing {INDEX})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path}: corrupt index ({e})") from e


class TokenShards:
    """All shards of one split as one memory-mapped token stream."""

    def __init__(self, shard_dir: str | os.PathLike, split: str = "train"):
        self.dir = Path(shard_dir)
        self.index = read_index(shard_dir)
        entries = self.index["splits"].get(split)
        if not entries:
            raise LmforgeError(f"{shard_dir}: no '{split}' shards")
        dtype = np.dtype(self.index["dtype"])
        self.arrays = []
        for e in entries:
            f = self.dir / e["file"]
            if not f.exists() or f.stat().st_size != e["tokens"] * dtype.itemsize:
                raise LmforgeError(f"{f}: missing or truncated shard (expected {e['tokens']} tokens)")
            self.arrays.append(np.memmap(f, dtype=dtype, mode="r"))
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.eos_id = self.index["eos_id"]
        self.vocab_size = self.index["vocab_size"]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def slice(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the stream, across shard boundaries, as int64."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"slice {start}+{length} outside {len(self)} tokens")
        out, pos, end = [], start, start + length
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        while pos < end:
            a, base = self.arrays[i], int(self.offsets[i])
            take = min(end, base + len(a)) - pos
            out.append(np.asarray(a[pos - base: pos - base + take], dtype=np.int64))
            pos += take
            i += 1
        return np.concatenate(out)
