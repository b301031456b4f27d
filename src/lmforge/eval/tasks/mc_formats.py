"""Readers for multiple-choice files in the formats the common benchmarks ship, normalised to
{"question", "choices": [str], "answer": int, "subject": str}.

- MMLU CSV (no header): question, choice..., answer letter; the subject is the file name
  (`abstract_algebra_test.csv` -> "abstract algebra").
- C-Eval CSV (header with question, A, B, C, D, answer; id/explanation ignored).
- ARC JSONL, official ({"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}) or
  Hugging Face style ({"question", "choices": {"text": [...], "label": [...]}, "answerKey"}).
- Generic JSONL: {"question", "choices" | "options": [...], "answer": index or letter, "subject"?},
  or C-Eval style columns A, B, C, D.
A directory is read file by file. Malformed rows are skipped and counted.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.tasks.base import read_jsonl

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def subject_from_name(path: Path) -> str:
    return re.sub(r"_(test|val|dev|train|validation)$", "", path.stem).replace("_", " ")


def _answer_index(answer, labels: list[str] | None, n: int) -> int:
    if isinstance(answer, bool):
        raise ValueError("boolean answer")
    if isinstance(answer, int):
        index = answer
    else:
        answer = str(answer).strip()
        if labels and answer in labels:
            index = labels.index(answer)
        elif len(answer) == 1 and answer.upper() in LETTERS:
            index = LETTERS.index(answer.upper())
        elif answer.isdigit():
            index = int(answer) - 1 if labels is None else labels.index(answer)
        else:
            raise ValueError(f"unreadable answer {answer!r}")
    if not 0 <= index < n:
        raise ValueError(f"answer {answer!r} outside {n} choices")
    return index


def _from_json_row(row: dict, subject: str) -> dict:
    labels = None
    question = row.get("question")
    if isinstance(question, dict):  # ARC official
        choices = [c["text"] for c in question["choices"]]
        labels = [str(c["label"]) for c in question["choices"]]
        question, answer = question["stem"], row["answerKey"]
    elif isinstance(row.get("choices"), dict):  # ARC, Hugging Face style
        choices, labels = list(row["choices"]["text"]), [str(x) for x in row["choices"]["label"]]
        answer = row.get("answerKey", row.get("answer"))
    elif isinstance(row.get("choices") or row.get("options"), list):
        choices = [str(c) for c in (row.get("choices") or row.get("options"))]
        answer = row.get("answer", row.get("label", row.get("answerKey")))
    elif "A" in row and "B" in row:  # C-Eval columns
        choices = [str(row[k]) for k in LETTERS if k in row]
        answer = row["answer"]
    else:
        raise ValueError("no choices")
    if not isinstance(question, str) or len(choices) < 2:
        raise ValueError("no question or fewer than two choices")
    return {"question": question, "choices": choices, "answer": _answer_index(answer, labels, len(choices)),
            "subject": str(row.get("subject") or subject)}


def _read_csv(path: Path, subject: str) -> tuple[list[dict], int]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    out, bad = [], 0
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "question" in header and "answer" in header:  # C-Eval
        for r in rows[1:]:
            try:
                out.append(_from_json_row({h: v for h, v in zip(header, r)} | {
                    k: r[header.index(k.lower())] for k in LETTERS[:8] if k.lower() in header}, subject))
            except (ValueError, KeyError, IndexError):
                bad += 1
        return out, bad
    for r in rows:  # MMLU: question, choices..., answer letter
        try:
            choices = r[1:-1]
            if len(choices) < 2:
                raise ValueError("fewer than two choices")
            out.append({"question": r[0], "choices": choices, "answer": _answer_index(r[-1], None, len(choices)),
                        "subject": subject})
        except ValueError:
            bad += 1
    return out, bad


def read_multiple_choice(path: str | Path) -> tuple[list[dict], int]:
    """(normalised questions, number of skipped rows) from a file or a directory of files."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix in (".csv", ".jsonl")) if path.is_dir() else [path]
    questions, bad = [], 0
    for f in files:
        subject = subject_from_name(f)
        if f.suffix == ".csv":
            rows, skipped = _read_csv(f, subject)
        elif f.suffix in (".jsonl", ".json"):
            rows, skipped = [], 0
            raw, skipped = read_jsonl(f, "task mc")
            for row in raw:
                try:
                    rows.append(_from_json_row(row, subject))
                except (ValueError, KeyError, TypeError):
                    skipped += 1
        else:
            raise LmforgeError(f"task mc: {f} is not .csv or .jsonl")
        questions += rows
        bad += skipped
    if not questions:
        raise LmforgeError(f"task mc: no readable questions in {path} ({bad} rows skipped)")
    return questions, bad
