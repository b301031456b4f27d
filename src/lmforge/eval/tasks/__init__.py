"""Task registry: `--tasks NAME[:PATH]`, options as `NAME.key=value` overrides."""
from __future__ import annotations

from lmforge.config import build
from lmforge.errors import LmforgeError
from lmforge.eval.tasks.base import Task
from lmforge.eval.tasks.bpb_text import BpbTask
from lmforge.eval.tasks.code import CodeTask, MbppTask
from lmforge.eval.tasks.math_word import MathTask
from lmforge.eval.tasks.multiple_choice import MultipleChoiceTask
from lmforge.eval.tasks.needle import NeedleTask

TASKS: dict[str, type[Task]] = {"bpb": BpbTask, "mc": MultipleChoiceTask, "gsm8k": MathTask,
                                "humaneval": CodeTask, "mbpp": MbppTask, "needle": NeedleTask}
# benchmark names that are one of the tasks above with different defaults
ALIASES: dict[str, tuple[str, dict]] = {
    "perplexity": ("bpb", {}), "mmlu": ("mc", {}), "ceval": ("mc", {}), "arc": ("mc", {"style": "cloze", "shots": 0}),
    "math": ("gsm8k", {}),
}


def make_task(spec: str, options: dict | None = None) -> Task:
    """'mc:data/arc.jsonl' + {'shots': 0} -> a configured task; the task's name is the spec's name."""
    name, _, path = spec.strip().partition(":")
    base, defaults = (name, {}) if name in TASKS else ALIASES.get(name, (None, {}))
    if base is None:
        raise LmforgeError(f"unknown task {name!r}; choose from {', '.join(sorted(TASKS) + sorted(ALIASES))}")
    cls = TASKS[base]
    values = {**defaults, **(options or {})}
    if path:
        field = "haystack_path" if base == "needle" else "path"
        values[field] = path
    task = cls(build(cls.config_class, values, where=name))
    task.name = name
    return task


__all__ = ["TASKS", "ALIASES", "make_task", "Task"]
