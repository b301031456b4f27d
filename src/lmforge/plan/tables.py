"""Rich tables for the planner's answers. Bytes are shown in GB (1e9), as the ZeRO paper does."""
from __future__ import annotations

from rich.table import Table

from lmforge.plan.advice import Verdict
from lmforge.plan.arithmetic import ModelSummary
from lmforge.plan.fitting import FitResult
from lmforge.plan.inference import DecodeBound, InferenceEstimate
from lmforge.plan.memory import comm_bytes_per_step
from lmforge.plan.timing import TrainingTime


def gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _two_columns(title: str, rows) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def params_table(name: str, s: ModelSummary) -> Table:
    rows = [("total parameters", f"{s.total_params:,} ({count(s.total_params)})")]
    if s.active_params != s.total_params:
        rows.append(("active per token (MoE)", f"{s.active_params:,} ({count(s.active_params)})"))
    rows += [("embedding parameters", f"{s.embedding_params:,}"),
             ("non-embedding parameters", f"{s.non_embedding_params:,}"),
             (f"training FLOPs/token @ seq {s.seq_len}", f"{s.flops_per_token:.4g}"),
             ("  of which 6N (dense)", f"{s.dense_flops_per_token:.4g}"),
             ("  of which attention", f"{s.attention_flops_per_token:.4g} "
                                      f"({100 * s.attention_flops_per_token / s.flops_per_token:.1f}%)"),
             ("KV cache per token (bf16)", f"{s.kv_bytes_per_token / 1024:,.1f} KiB")]
    return _two_columns(f"model {name}", rows)


def describe_plan(p) -> str:
    return (f"{p.gpus} GPUs: dp={p.dp} tp={p.tp}{' (lmforge layout)' if p.tp_layout == 'lmforge' else ''} "
            f"pp={p.pp}{' +sp' if p.sp else ''}, ZeRO-{p.zero}"
            f"{'' if p.reshard_after_forward else ' (FSDP, no reshard after forward)'}, "
            f"{p.precision} precision, micro-batch {p.micro_batch} x {p.seq_len} tokens, "
            f"recompute {p.recompute}{', flash attention' if p.flash else ''}"
            f"{', offload ' + p.offload if p.offload != 'none' else ''}")


def comm_line(cfg, p) -> str:
    """Data-parallel traffic per GPU and step (one micro-batch per step)."""
    parts = {k: v for k, v in comm_bytes_per_step(cfg, p).items() if v}
    return "data-parallel collectives per GPU per micro-batch: " + ", ".join(f"{k} {gb(v)}" for k, v in parts.items())


def memory_table(v: Verdict) -> Table:
    e = v.estimate
    table = Table(title="training memory per GPU")
    table.add_column("part")
    table.add_column("GPU memory", justify="right")
    for name, value in e.parts.items():
        if value:
            table.add_row(name, gb(value))
    table.add_row("[bold]total[/]", f"[bold]{gb(e.total)}[/]")
    if e.cpu_bytes:
        table.add_row("CPU memory (offloaded)", gb(e.cpu_bytes))
    return table


def verdict_line(v: Verdict) -> str:
    e = v.estimate
    verdict = "[green]fits[/]" if v.fits else "[red]does not fit[/]"
    return (f"largest GPU: the {e.stage} pipeline stage, {count(e.params_per_gpu)} params per TP/PP shard. "
            f"{v.gpu.name}: {gb(v.gpu.memory_bytes)}, {gb(v.usable)} usable -> {verdict}")


def suggestions_table(v: Verdict) -> Table | None:
    rows = v.suggestions or ([v.combined] if v.combined else [])
    if not rows:
        return None
    title = "any one of these makes it fit" if v.suggestions else "changes combined"
    table = Table(title=title)
    table.add_column("change")
    table.add_column("total per GPU", justify="right")
    table.add_column("fits")
    for s in rows:
        table.add_row(s.change, gb(s.total), "[green]yes[/]" if s.fits else "[red]no: add GPUs[/]")
    return table


def inference_table(name: str, e: InferenceEstimate, batch: int, seq_len: int, gpu=None, usable=None,
                    max_batch: int | None = None, bound: DecodeBound | None = None) -> Table:
    rows = [(k, gb(v)) for k, v in e.parts.items()]
    rows.append(("[bold]total per GPU[/]", f"[bold]{gb(e.total)}[/]"))
    rows.append(("KV cache per token", f"{e.kv_per_token / 1024:,.1f} KiB"))
    rows.append(("KV cache per sequence", gb(e.kv_per_token * seq_len)))
    if gpu is not None:
        rows.append((f"fits {gpu.name} ({gb(usable)} usable)", "[green]yes[/]" if e.total <= usable else "[red]no[/]"))
        rows.append((f"largest batch at {seq_len} tokens", f"{max_batch}"))
    if bound is not None:
        kind = "memory" if bound.memory_bound else "compute"
        rows.append((f"decode step floor, {seq_len} tokens of context",
                     f"{bound.seconds * 1e3:,.2f} ms ({kind}-bound: {gb(bound.bytes)} read, "
                     f"{bound.flops / 1e12:,.2f} TFLOP)"))
        rows.append(("decode tokens/s ceiling", f"{bound.tokens_per_s / bound.batch:,.0f} per sequence, "
                                                f"{bound.tokens_per_s:,.0f} for the batch"))
    return _two_columns(f"inference {name}: batch {batch} x {seq_len} tokens, tp={e.tp}", rows)


def time_table(t: TrainingTime) -> Table:
    rows = [("total training FLOPs", f"{t.total_flops:.3e}"),
            ("GPUs x peak x MFU", f"{t.gpus} x {t.peak_flops / 1e12:,.0f} TFLOP/s x {t.mfu:.0%}"),
            ("wall-clock", f"{t.seconds / 3600:,.1f} h ({t.days:,.2f} days)"),
            ("GPU-hours", f"{t.gpu_hours:,.0f}")]
    if t.cost is not None:
        rows.append(("cost", f"${t.cost:,.0f}"))
    return _two_columns("training time", rows)


def optimal_table(compute: float, rows: list[tuple[str, float, float, float | None]]) -> Table:
    table = Table(title=f"compute-optimal size for C = {compute:.3g} FLOPs (C = 6ND)")
    for column in ("law", "N* params", "D* tokens", "tokens/param", "loss at optimum"):
        table.add_column(column, justify="left" if column == "law" else "right")
    for name, n, d, loss in rows:
        table.add_row(name, count(n), count(d), f"{d / n:.1f}", "" if loss is None else f"{loss:.3f}")
    return table


def fit_table(result: FitResult, title: str) -> Table:
    table = Table(title=title)
    table.add_column("parameter")
    table.add_column("estimate", justify="right")
    if result.intervals:
        table.add_column(f"{result.level:.0%} bootstrap interval", justify="right")
    for name, value in result.params.items():
        label = "a = beta/(alpha+beta)  (N* ~ C^a)" if name == "a" and "alpha" in result.params else name
        cells = [label, f"{value:.4g}"]
        if result.intervals:
            lo, hi = result.intervals[name]
            cells.append(f"[{lo:.4g}, {hi:.4g}]")
        table.add_row(*cells)
    table.caption = f"{result.n_runs} runs; rms log-residual {result.rms_log_residual:.4f}"
    return table
