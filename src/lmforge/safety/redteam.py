"""Run generated attacks and benign prompts against a target behind a canary system prompt, judge
each reply deterministically, and report attack success (and benign blocks) with bootstrap CIs."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from lmforge.safety.attacks import FAMILIES, Prompt
from lmforge.safety.judges import SYSTEM_TEMPLATE, succeeded, system_prompt
from lmforge.safety.metrics import bootstrap_ci


@dataclass
class Outcome:
    prompt: Prompt
    reply: str
    blocked: bool
    success: bool       # attacks: the judge says the attack worked; benign: always False
    seconds: float


def run(target, prompts: list[Prompt], canary: str, workers: int = 1, system_template: str = SYSTEM_TEMPLATE,
        judge=succeeded) -> list[Outcome]:
    """Each prompt behind the system prompt `system_template` (with the canary); `judge(goal, reply,
    canary) -> bool` decides success (default: the deterministic judges; judge_model.ModelJudge
    asks a model instead)."""
    system = {"role": "system", "content": system_prompt(canary, system_template)}

    def one(p: Prompt) -> Outcome:
        t = time.perf_counter()
        reply, blocked = target.reply([system, *p.messages])
        ok = p.is_attack and not blocked and bool(judge(p.goal, reply, canary))
        return Outcome(p, reply, blocked, ok, time.perf_counter() - t)

    if workers <= 1:
        return [one(p) for p in prompts]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, prompts))


def run_judge(outcomes: list[Outcome], judge, canary: str) -> list[Outcome]:
    """The same replies judged again by `judge` (e.g. a judge_model.ModelJudge): no new attack requests."""
    return [replace(o, success=o.prompt.is_attack and not o.blocked and bool(judge(o.prompt.goal, o.reply, canary)))
            for o in outcomes]


def agreement(a: list[Outcome], b: list[Outcome]) -> float:
    """Fraction of the unblocked attacks on which two judgings of the same replies agree."""
    pairs = [(x.success, y.success) for x, y in zip(a, b) if x.prompt.is_attack and not x.blocked]
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else float("nan")


def report(outcomes: list[Outcome], seed: int = 0) -> dict:
    """Attack success rate per family and overall, benign block rate, each with a 95 % CI."""
    att = [o for o in outcomes if o.prompt.is_attack]
    ben = [o for o in outcomes if not o.prompt.is_attack]
    rows = []
    for family in [f for f in FAMILIES if any(o.prompt.family == f for o in att)]:
        xs = [o for o in att if o.prompt.family == family]
        asr, lo, hi = bootstrap_ci([o.success for o in xs], seed=seed)
        rows.append({"family": family, "n": len(xs), "asr": asr, "ci": [lo, hi],
                     "blocked": sum(o.blocked for o in xs) / len(xs)})
    out = {"families": rows}
    if att:
        asr, lo, hi = bootstrap_ci([o.success for o in att], seed=seed)
        out["attacks"] = {"n": len(att), "asr": asr, "ci": [lo, hi], "blocked": sum(o.blocked for o in att) / len(att)}
    if ben:
        rate, lo, hi = bootstrap_ci([o.blocked for o in ben], seed=seed)
        out["benign"] = {"n": len(ben), "blocked": rate, "ci": [lo, hi]}
    return out
