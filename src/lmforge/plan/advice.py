"""Does a training plan fit a GPU, and if not, which changes would make it fit.

Changes are tried one at a time, then accumulated in order (each kept only if it lowers the
peak), so the answer is both "any one of these is enough" and "all of these together".
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from lmforge.model.config import ModelConfig
from lmforge.plan.gpus import GPU
from lmforge.plan.memory import MemoryEstimate, TrainingPlan, training_memory

HEADROOM = 0.10  # kept free for the CUDA context, allocator fragmentation and communication buffers


@dataclass
class Suggestion:
    change: str
    plan: TrainingPlan
    total: float        # peak GPU bytes with the change
    fits: bool


@dataclass
class Verdict:
    estimate: MemoryEstimate
    gpu: GPU
    usable: float       # GPU bytes available after the headroom
    fits: bool
    suggestions: list[Suggestion]   # single changes that fit on their own
    combined: Suggestion | None     # all helpful changes together, when no single one is enough


def candidate_changes(cfg: ModelConfig, plan: TrainingPlan) -> list[tuple[str, TrainingPlan]]:
    """Plausible next steps, cheapest first (in throughput lost or hardware added)."""
    out = []
    if not plan.flash:
        out.append(("use flash attention (no s x s activations)", replace(plan, flash=True)))
    if plan.dp > 1 and plan.zero < 3:
        stage = plan.zero + 1
        out.append((f"ZeRO stage {stage} (shard {['optimizer states', 'gradients', 'weights'][stage - 1]} "
                    f"over {plan.dp} GPUs)", replace(plan, zero=stage)))
        if plan.zero < 2:
            out.append(("ZeRO stage 3", replace(plan, zero=3)))
    if plan.tp > 1 and not plan.sp:
        out.append(("sequence parallelism", replace(plan, sp=True)))
    if plan.recompute == "none":
        out.append(("selective activation recomputation", replace(plan, recompute="selective")))
    if plan.recompute != "full":
        out.append(("full activation checkpointing", replace(plan, recompute="full")))
    if plan.micro_batch > 1:
        half = plan.micro_batch // 2
        out.append((f"micro-batch {half} (2x gradient accumulation keeps the global batch)",
                    replace(plan, micro_batch=half)))
    tp = plan.tp * 2
    if tp <= 8 and cfg.n_heads % tp == 0:
        if plan.dp % 2 == 0:
            out.append((f"tp={tp} with dp={plan.dp // 2} (same GPU count)", replace(plan, tp=tp, dp=plan.dp // 2)))
        else:
            out.append((f"tp={tp} (2x the GPUs)", replace(plan, tp=tp)))
    if plan.pp * 2 <= cfg.n_layers:
        out.append((f"pp={plan.pp * 2} (2x the GPUs)", replace(plan, pp=plan.pp * 2)))
    if plan.offload == "none":
        out.append(("offload optimizer states to CPU", replace(plan, offload="optimizer")))
    if plan.offload != "params":
        out.append(("ZeRO-3 with weights and optimizer offloaded to CPU", replace(plan, zero=3, offload="params")))
    return out


def _changed_fields(step: TrainingPlan, origin: TrainingPlan) -> set[str]:
    return {k for k in step.__dataclass_fields__ if getattr(step, k) != getattr(origin, k)}


def _apply(base: TrainingPlan, step: TrainingPlan, origin: TrainingPlan) -> TrainingPlan:
    """Carry over onto `base` the fields in which `step` differs from `origin`."""
    return replace(base, **{k: getattr(step, k) for k in _changed_fields(step, origin)})


def check_fit(cfg: ModelConfig, plan: TrainingPlan, gpu: GPU, headroom: float = HEADROOM) -> Verdict:
    estimate = training_memory(cfg, plan)
    usable = gpu.memory_bytes * (1 - headroom)
    fits = estimate.total <= usable
    singles, combined = [], None
    if not fits:
        candidates = candidate_changes(cfg, plan)
        for change, changed in candidates:
            total = training_memory(cfg, changed).total
            if total <= usable:
                singles.append(Suggestion(change, changed, total, True))
        if not singles:
            current, best = plan, estimate.total
            applied: dict[str, set] = {}   # change name -> the plan fields it set
            for change, changed in candidates:
                trial = _apply(current, changed, plan)
                total = training_memory(cfg, trial).total
                if total < best:
                    fields = _changed_fields(changed, plan)
                    # A later change of the same knob (ZeRO 1 -> 3) replaces the earlier one.
                    applied = {k: v for k, v in applied.items() if not v & fields}
                    applied[change] = fields
                    current, best = trial, total
                    if total <= usable:
                        break
            combined = Suggestion(" + ".join(applied), current, best, best <= usable)
    return Verdict(estimate, gpu, usable, fits, singles, combined)
