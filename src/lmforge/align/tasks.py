"""Verifiable tasks generated in code (no downloads) and their reward functions.

Arithmetic: "What is 37 + 48? Answer:" -> 85. The train and held-out splits are disjoint by
construction: an operand pair belongs to the held-out split when a fixed hash of it says so, so
no held-out question is ever trained on whatever the seeds.
"""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

from lmforge.errors import LmforgeError

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: int


def _held_out(a: int, b: int, op: str, val_share: float) -> bool:
    return zlib.crc32(f"{a}{op}{b}".encode()) % 1000 < val_share * 1000


def arithmetic_tasks(n: int, seed: int, split: str = "train", max_operand: int = 99, ops: str = "+",
                     val_share: float = 0.1) -> list[Task]:
    """n questions of the given split, drawn with `seed` (questions may repeat within a split)."""
    if split not in ("train", "val"):
        raise LmforgeError(f"unknown split {split!r}; expected train or val")
    if not ops or any(op not in OPS for op in ops):
        raise LmforgeError(f"grpo.ops must be made of {''.join(OPS)} (got {ops!r})")
    if max_operand < 3 or not 0 < val_share < 1:
        raise LmforgeError("arithmetic tasks need max_operand >= 3 and 0 < val_share < 1")
    rng = random.Random(f"{seed}/{split}")
    tasks: list[Task] = []
    while len(tasks) < n:
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        if _held_out(a, b, op, val_share) == (split == "val"):
            tasks.append(Task(f"What is {a} {op} {b}? Answer:", OPS[op](a, b)))
    return tasks


def first_integer(text: str) -> int | None:
    m = INTEGER.search(text)
    return int(m.group()) if m else None


def exact_match_reward(completion: str, task: Task) -> float:
    """1.0 when the completion's first integer is the answer, else 0.0 (none counts as wrong)."""
    return 1.0 if first_integer(completion) == task.answer else 0.0
