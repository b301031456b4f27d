"""The task interface the runner drives, and helpers shared by the task files.

A task turns its config into a list of items (dicts with a stable "key"), evaluates a batch of
items against a backend (one result dict per item, JSON-serialisable, so the runner can cache it
per model and skip finished items on a re-run), and aggregates all results into metrics.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Protocol, runtime_checkable

from lmforge.errors import LmforgeError
from lmforge.eval.backend import Backend


@runtime_checkable
class EvalTask(Protocol):
    """What the runner asks of a task (`Task` below is the shared base the task files extend)."""

    name: str
    config: object           # a dataclass of the task's options
    chunk_size: int          # items per evaluate() call: the unit of caching and progress

    def items(self) -> list[dict]:
        """The items to score, each a dict with a stable "key"."""
        ...

    def evaluate(self, backend: Backend, items: list[dict]) -> list[dict]:
        """One JSON-serialisable result per item."""
        ...

    def aggregate(self, items: list[dict], results: list[dict], out_dir: Path | None) -> dict:
        """-> {"metrics": {...}, "stderr": {...}, optional "artifacts": [paths], "details": {...}}"""
        ...

    def fingerprint(self) -> str:
        """Identity of everything that changes item results (prompting, sampling, the data)."""
        ...


class Task:
    name: str = ""
    config_class: type = object
    chunk_size: int = 32  # items per evaluate() call: the unit of caching and progress

    def __init__(self, config):
        self.config = config

    def items(self) -> list[dict]:
        raise NotImplementedError

    def evaluate(self, backend: Backend, items: list[dict]) -> list[dict]:
        raise NotImplementedError

    def aggregate(self, items: list[dict], results: list[dict], out_dir: Path | None) -> dict:
        """-> {"metrics": {...}, "stderr": {...}, optional "artifacts": [paths], "details": {...}}"""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identity of everything that changes item results (prompting, sampling, the data)."""
        blob = json.dumps(dataclasses.asdict(self.config), sort_keys=True, default=str)
        path = getattr(self.config, "path", None)
        if path and Path(path).exists():
            p = Path(path)
            st = p.stat()
            blob += f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_jsonl(path: str | Path, where: str) -> tuple[list[dict], int]:
    """Rows of a JSONL file; malformed lines are skipped and counted, never fatal."""
    rows, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    if not rows:
        raise LmforgeError(f"{where}: no usable JSON objects in {path}")
    return rows, bad


def require_path(path: str | None, task: str, what: str) -> Path:
    if not path:
        raise LmforgeError(f"task {task} needs a data file: use --tasks {task}:PATH ({what})")
    p = Path(path)
    if not p.exists():
        raise LmforgeError(f"task {task}: {path} not found")
    return p
