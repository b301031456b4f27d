"""Verifiable tasks generated in code (no downloads) and their reward functions: arithmetic scored
by exact match, and small coding tasks scored by their unit tests in the eval sandbox.

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
from lmforge.eval.sandbox import SandboxLimits, run_program

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


# --- small coding tasks, rewarded by their unit tests in the eval sandbox ------------------------------
@dataclass(frozen=True)
class CodeTask:
    """Write the body of `header` (a signature + docstring); `tests` are asserts run after it."""
    prompt: str
    header: str
    tests: str


# (name, docstring, argument, reference implementation, test inputs); each task draws a constant k
CODE_TEMPLATES = [
    ("add_{k}", "Return x plus {k}.", "x", lambda k: lambda x: x + k, [0, 3, -7, 100]),
    ("times_{k}", "Return x multiplied by {k}.", "x", lambda k: lambda x: x * k, [0, 2, -5, 11]),
    ("count_over_{k}", "Return how many items of xs are greater than {k}.", "xs",
     lambda k: lambda xs: sum(v > k for v in xs), [[], list(range(10)), [-3, 50, 7, 7]]),
    ("first_{k}_reversed", "Return the first {k} characters of s, reversed.", "s",
     lambda k: lambda s: s[:k][::-1], ["", "abcdefghij", "xy"]),
]


def coding_tasks(n: int, seed: int, split: str = "train") -> list[CodeTask]:
    """n small function-writing tasks; the constant k makes train (k even) and val (k odd) disjoint."""
    if split not in ("train", "val"):
        raise LmforgeError(f"unknown split {split!r}; expected train or val")
    rng = random.Random(f"code/{seed}/{split}")
    tasks = []
    for _ in range(n):
        name, doc, arg, impl, inputs = rng.choice(CODE_TEMPLATES)
        k = 2 * rng.randint(1, 9) + (split == "val")
        fn, f = name.format(k=k), impl(k)
        header = f'def {fn}({arg}):\n    """{doc.format(k=k)}"""\n'
        tests = "\n".join(f"assert {fn}({v!r}) == {f(v)!r}" for v in inputs)
        tasks.append(CodeTask(f"Write the body of this Python function.\n\n{header}", header, tests))
    return tasks


def code_program(completion: str, task: CodeTask) -> str:
    """The program the sandbox runs: the header, the completion as its body, then the tests."""
    return f"{task.header}{completion.rstrip()}\n\n{task.tests}\n"


def unit_test_reward(completion: str, task: CodeTask, limits: SandboxLimits | None = None) -> float:
    """1.0 when the completion, as the function's body, passes the task's tests in the eval sandbox
    (no network, CPU/memory/time limits; refuses to run without isolation), else 0.0."""
    result = run_program(code_program(completion, task), limits or SandboxLimits(cpu_seconds=5, wall_seconds=10))
    return 1.0 if result.passed else 0.0
