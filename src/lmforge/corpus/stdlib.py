"""The embedded default corpus: the running interpreter's standard-library `.py` files.

Train/val membership is decided by a hash of the path relative to the stdlib root, so the split
is the same on every machine and does not move when files are added or removed.
"""
from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from lmforge.corpus.document import Document

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_split(relpath: str, val_fraction: float = 0.05) -> str:
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


def stdlib_documents(split: str | None = None, val_fraction: float = 0.05, root: Path | None = None,
                     limit: int | None = None) -> Iterator[Document]:
    """Yield stdlib source files in sorted path order; split='train'|'val'|None (all)."""
    root = root or stdlib_root()
    n = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if SKIP_DIRS.intersection(rel.split("/")[:-1]):
            continue
        part = stdlib_split(rel, val_fraction)
        if split is not None and part != split:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of test files are deliberately not UTF-8
        yield Document(id=f"stdlib:{rel}", text=text, source="stdlib", meta={"path": rel, "split": part})
        n += 1
        if limit is not None and n >= limit:
            return
