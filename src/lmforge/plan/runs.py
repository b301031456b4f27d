"""Reading and writing run tables: one training run per CSV row, with N, D and the final loss.

Columns (case-insensitive; common aliases accepted): N (parameters), D (training tokens),
loss (final validation loss), optionally C (training FLOPs; 6ND when absent) and name.
Every problem is reported with its row and column, as an LmforgeError.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError

ALIASES = {
    "N": ("n", "params", "n_params", "parameters"),
    "D": ("d", "tokens", "n_tokens", "train_tokens"),
    "loss": ("loss", "val_loss", "l", "final_loss"),
    "C": ("c", "flops", "compute", "train_flops"),
}
REQUIRED = ("N", "D", "loss")


@dataclass
class Runs:
    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray
    C: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.loss)


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise LmforgeError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise LmforgeError(f"{where}: must be a positive finite number, got {text!r}")
    return value


def read_runs(path: str | Path) -> Runs:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LmforgeError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: cannot read ({e})") from e
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or []) if h is not None]
    if not header:
        raise LmforgeError(f"{path}: empty file; expected a header with columns {', '.join(REQUIRED)}")
    lookup = {h.lower(): h for h in header}
    columns = {}
    for key, aliases in ALIASES.items():
        found = next((lookup[a] for a in aliases if a in lookup), None)
        if found:
            columns[key] = found
    missing = [k for k in REQUIRED if k not in columns]
    if missing:
        raise LmforgeError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(header)}); "
                           f"accepted names: " + "; ".join(f"{k}: {'/'.join(ALIASES[k])}" for k in missing))
    values = {k: [] for k in ALIASES}
    names = []
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): v for k, v in row.items()}
        if all(not (v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # blank line
        for key, column in columns.items():
            cell = (row.get(column) or "").strip()
            if key == "C" and not cell:
                values[key].append(math.nan)
                continue
            values[key].append(_number(cell, f"{path} line {line}, column {column}"))
        names.append((row.get("name") or f"run{len(names) + 1}").strip())
    if not names:
        raise LmforgeError(f"{path}: no runs (only a header)")
    N, D, loss = (np.array(values[k]) for k in REQUIRED)
    C = np.array(values["C"]) if "C" in columns else np.full(len(N), math.nan)
    C = np.where(np.isnan(C), 6 * N * D, C)
    return Runs(N, D, loss, C, names)


def write_runs(path: str | Path, rows: list[dict]) -> Path:
    """Write rows holding name, N, D, C and loss (plus any extra columns) as CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["name", "N", "D", "C", "loss"]
    fields += [k for k in rows[0] if k not in fields] if rows else []
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path
