"""`lmforge plan ...` (params, memory, inference, time, optimal, gpus) and `lmforge scaling ...`
(fit, sweep): the planning maths as commands. Every number they print has a Python API in
`lmforge.plan`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lmforge.errors import LmforgeError

plan_app = typer.Typer(help="Plan before spending compute: parameters, FLOPs, memory, time, optimal size.",
                       no_args_is_help=True)
scaling_app = typer.Typer(help="Fit scaling laws to runs, or train a tiny sweep on CPU and fit it.",
                          no_args_is_help=True)
SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def number(text: str, what: str = "value") -> float:
    """'7e9', '7B', '1.4T', '5.76e23' -> float (K, M, B/G, T suffixes)."""
    t = str(text).strip().lower().replace("_", "").replace(",", "")
    scale = SUFFIXES.get(t[-1:], 1.0)
    if t[-1:] in SUFFIXES:
        t = t[:-1]
    try:
        value = float(t) * scale
    except ValueError:
        raise LmforgeError(f"{what} {text!r} is not a number (examples: 7e9, 7B, 1.4T)") from None
    if not 0 < value < float("inf"):
        raise LmforgeError(f"{what} must be a positive finite number, got {text!r}")
    return value


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise LmforgeError(f"{what} must be comma-separated integers, got {text!r}") from None


@plan_app.command("params")
def params_command(model: str = typer.Argument(..., help="preset name, HF config.json, or model directory"),
                   seq_len: int = typer.Option(None, min=1, help="sequence length for the attention FLOPs "
                                                          "(default: the model's)")):
    """Parameter count (total, active, embedding) and training FLOPs per token."""
    from lmforge.plan.arithmetic import resolve_model, summarize
    from lmforge.plan.tables import params_table
    Console().print(params_table(model, summarize(resolve_model(model), seq_len)))


@plan_app.command("memory")
def memory_command(
    model: str = typer.Argument(..., help="preset name, HF config.json, or model directory"),
    gpu: str = typer.Option("h100", help="GPU to fit on (see `lmforge plan gpus`)"),
    gpus: int = typer.Option(0, min=0, help="total GPUs (default tp*pp, i.e. no data parallelism)"),
    tp: int = typer.Option(1, min=1, help="tensor-parallel degree"),
    pp: int = typer.Option(1, min=1, help="pipeline-parallel degree"),
    sp: bool = typer.Option(False, "--sp", help="sequence parallelism (with tp > 1)"),
    tp_layout: str = typer.Option("megatron", help="what tp splits: megatron (every weight, vocab-parallel "
                                  "embeddings) or lmforge (block matrices; embeddings, head, norms whole)"),
    zero: int = typer.Option(0, min=0, max=3, help="ZeRO stage 0-3 over the data-parallel ranks "
                             "(3: lmforge's FSDP2 layout, as `lmforge train` under torchrun)"),
    reshard: bool = typer.Option(True, "--reshard/--no-reshard",
                                 help="ZeRO-3/FSDP2: free each block's gathered weights after its forward "
                                      "(parallel.reshard_after_forward)"),
    micro_batch: int = typer.Option(1, min=1, help="sequences per GPU per forward/backward"),
    seq_len: int = typer.Option(2048, min=1),
    recompute: str = typer.Option("none", help="activation checkpointing: none, selective or full"),
    offload: str = typer.Option("none", help="CPU offload: none, optimizer, or params (needs ZeRO-3)"),
    precision: str = typer.Option("mixed", help="mixed (bf16 + fp32 Adam, 16 B/param) or fp32"),
    flash: bool = typer.Option(False, "--flash", help="flash attention (no s x s activations)"),
    fused_loss: bool = typer.Option(True, "--fused-loss/--unfused-loss",
                                    help="loss fused with the LM head (lmforge) or full fp32 logits kept"),
    headroom: float = typer.Option(0.10, help="fraction of GPU memory kept free"),
):
    """Per-GPU training memory under ZeRO/TP/PP/SP, whether it fits, and what to change if not."""
    from lmforge.plan.advice import check_fit
    from lmforge.plan.arithmetic import resolve_model
    from lmforge.plan.gpus import get_gpu
    from lmforge.plan.memory import TrainingPlan
    from lmforge.plan.tables import comm_line, describe_plan, memory_table, suggestions_table, verdict_line
    total = gpus or tp * pp
    if tp < 1 or pp < 1 or total % (tp * pp):
        raise LmforgeError(f"impossible plan: {total} GPUs cannot be split into tp={tp} x pp={pp} groups")
    if not 0 <= headroom < 1:
        raise LmforgeError("headroom is a fraction in [0, 1)")
    plan = TrainingPlan(micro_batch=micro_batch, seq_len=seq_len, dp=total // (tp * pp), tp=tp, pp=pp, sp=sp,
                        zero=zero, recompute=recompute, offload=offload, precision=precision, flash=flash,
                        fused_loss=fused_loss, reshard_after_forward=reshard, tp_layout=tp_layout)
    verdict = check_fit(resolve_model(model), plan, get_gpu(gpu), headroom)
    console = Console()
    console.print(describe_plan(plan), highlight=False)
    console.print(memory_table(verdict))
    console.print(verdict_line(verdict), highlight=False)
    advice = suggestions_table(verdict)
    if advice is not None:
        console.print(advice)
    if plan.dp > 1:
        console.print(comm_line(resolve_model(model), plan), highlight=False)


@plan_app.command("inference")
def inference_command(
    model: str = typer.Argument(..., help="preset name, HF config.json, or model directory"),
    batch: int = typer.Option(1, min=1, help="concurrent sequences"),
    seq_len: int = typer.Option(None, min=1, help="tokens per sequence, prompt + output (default: the model's max)"),
    weights: str = typer.Option("bf16", help="fp32, bf16, fp16, fp8, int8, int4, q4_0"),
    kv: str = typer.Option("bf16", help="KV cache precision: fp32, bf16, fp16, fp8, int8"),
    tp: int = typer.Option(1, min=1, help="tensor-parallel degree"),
    gpu: str = typer.Option("h100"),
    headroom: float = typer.Option(0.10, help="fraction of GPU memory kept free"),
):
    """Inference memory: weights at a precision plus the KV cache, and the largest batch that fits;
    the decode roofline: the fastest a step can be (every weight and the batch's K/V read once)."""
    from lmforge.plan.arithmetic import resolve_model
    from lmforge.plan.gpus import get_gpu
    from lmforge.plan.inference import decode_bound, inference_memory, max_batch
    from lmforge.plan.tables import inference_table
    if not 0 <= headroom < 1:
        raise LmforgeError("headroom is a fraction in [0, 1)")
    cfg, device = resolve_model(model), get_gpu(gpu)
    seq_len = seq_len or cfg.max_seq_len
    estimate = inference_memory(cfg, batch, seq_len, weights, kv, tp)
    usable = device.memory_bytes * (1 - headroom)
    biggest = max_batch(cfg, usable, seq_len, weights=weights, kv=kv, tp=tp)
    bound = decode_bound(cfg, batch, seq_len, device.bandwidth, device.peak_flops, weights, kv, tp)
    Console().print(inference_table(model, estimate, batch, seq_len, device, usable, biggest, bound))


@plan_app.command("time")
def time_command(
    model: str = typer.Argument(None, help="preset/config: counts attention FLOPs too (else give --params)"),
    params: str = typer.Option(None, help="parameter count N, e.g. 7e9 or 7B"),
    tokens: str = typer.Option(..., help="training tokens D, e.g. 1.4T"),
    gpus: int = typer.Option(8, min=1, help="number of GPUs"),
    gpu: str = typer.Option("h100", help="GPU whose bf16 peak is used"),
    peak_tflops: float = typer.Option(None, help="override the per-GPU peak, in TFLOP/s"),
    mfu: float = typer.Option(0.4, help="model FLOPs utilisation, a fraction of peak"),
    price: float = typer.Option(None, help="$ per GPU-hour, for a cost estimate"),
    seq_len: int = typer.Option(None, min=1, help="sequence length for the attention FLOPs (with MODEL)"),
):
    """Training time and cost for N params x D tokens on G GPUs at a peak and an MFU."""
    from lmforge.plan.gpus import get_gpu
    from lmforge.plan.tables import time_table
    from lmforge.plan.timing import training_time
    if (model is None) == (params is None):
        raise LmforgeError("give either a MODEL or --params N (not both)")
    flops_per_token, n = None, 0.0
    if model is not None:
        from lmforge.plan.arithmetic import resolve_model
        cfg = resolve_model(model)
        n, flops_per_token = cfg.num_params(active=True), cfg.flops_per_token(seq_len)
    else:
        n = number(params, "--params")
    peak = peak_tflops * 1e12 if peak_tflops else get_gpu(gpu).peak_flops
    Console().print(time_table(training_time(n, number(tokens, "--tokens"), gpus, peak, mfu, price,
                                             flops_per_token)))


@plan_app.command("optimal")
def optimal_command(compute: str = typer.Argument(..., help="FLOP budget, e.g. 5.76e23"),
                    law: str = typer.Option(None, help="only this law: a published name or a fitted JSON"),
                    ratio: float = typer.Option(20.0, help="tokens per parameter of the rule-of-thumb row")):
    """Compute-optimal N* and D* for a FLOP budget under published (or fitted) Chinchilla laws."""
    from lmforge.plan.laws import PUBLISHED, get_law, optimal_by_ratio
    from lmforge.plan.tables import optimal_table
    c = number(compute, "compute")
    if not 0 < ratio < float("inf"):
        raise LmforgeError(f"--ratio must be a positive finite number, got {ratio}")
    laws = {law: get_law(law)} if law else PUBLISHED
    rows = []
    for name, scaling_law in laws.items():
        n, d = scaling_law.optimal(c)
        rows.append((f"{name} ({scaling_law.name})", n, d, scaling_law.loss(n, d)))
    if not law:
        n, d = optimal_by_ratio(c, ratio)
        rows.append((f"{ratio:g} tokens/parameter rule", n, d, None))
    Console().print(optimal_table(c, rows))


@plan_app.command("gpus")
def gpus_command():
    """The GPUs the planner knows, with memory, memory bandwidth and dense bf16 peak."""
    from rich.table import Table

    from lmforge.plan.gpus import GPUS
    table = Table(title="GPUs")
    for column in ("name", "memory", "bandwidth", "bf16 peak"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for g in GPUS.values():
        table.add_row(g.name, f"{g.memory_bytes / 2**30:.0f} GiB", f"{g.bandwidth / 1e9:,.0f} GB/s",
                      f"{g.peak_flops / 1e12:,.0f} TFLOP/s")
    Console().print(table)


def _report_fit(csv_path: Path, predict, plot: str, bootstrap: int, save: str, power_law: bool,
                irreducible: bool, seed: int, console: Console) -> None:
    from lmforge.plan.fitting import fit_chinchilla, fit_power_law, predict_interval
    from lmforge.plan.plots import plot_chinchilla_fit, plot_power_law
    from lmforge.plan.runs import read_runs
    from lmforge.plan.tables import fit_table
    runs = read_runs(csv_path)
    plot_path = Path(plot) if plot else csv_path.with_name(csv_path.stem + "_fit.png")
    if power_law:
        law, result = fit_power_law(runs.C, runs.loss, irreducible, bootstrap, seed)
        console.print(fit_table(result, "L(C) = a C^-b" + (" + E" if irreducible else "")))
        console.print(f"plot: {plot_power_law(runs.C, runs.loss, law, plot_path)}")
        return
    result = fit_chinchilla(runs.N, runs.D, runs.loss, bootstrap, seed)
    console.print(fit_table(result, "L(N, D) = E + A/N^alpha + B/D^beta"))
    if predict:
        n, d = number(predict[0], "N"), number(predict[1], "D")
        line = f"predicted loss at N={n:.3g}, D={d:.3g}: [bold]{result.law.loss(n, d):.4f}[/]"
        if result.bootstrap is not None:
            lo, hi = predict_interval(result, n, d)
            line += f" ({result.level:.0%} interval {lo:.4f} to {hi:.4f})"
        console.print(line)
    if save:
        result.law.save(save)
        console.print(f"law saved to {save} (use it with `lmforge plan optimal C --law {save}`)")
    console.print(f"plot: {plot_chinchilla_fit(runs, result.law, plot_path)}")


@scaling_app.command("fit")
def fit_command(
    runs_csv: Path = typer.Argument(..., help="CSV with columns N, D, loss (optional C, name)"),
    predict: Optional[tuple[str, str]] = typer.Option(None, help="predict the loss at N D, e.g. --predict 7e9 1.2e12"),
    plot: str = typer.Option("", help="PNG path (default: next to the CSV)"),
    bootstrap: int = typer.Option(100, min=0, help="bootstrap resamples for confidence intervals (0: none)"),
    save: str = typer.Option("", help="write the fitted law as JSON"),
    power_law: bool = typer.Option(False, "--power-law", help="fit L(C) = a C^-b instead of L(N, D)"),
    irreducible: bool = typer.Option(False, "--irreducible", help="with --power-law: add a constant E"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="bootstrap resampling seed"),
):
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (Huber on log-loss, L-BFGS, bootstrap intervals)."""
    _report_fit(runs_csv, predict if predict and predict[0] is not None else None, plot, bootstrap, save, power_law,
                irreducible, seed, Console())


@scaling_app.command("sweep")
def sweep_command(
    out: str = typer.Option("runs/scaling-sweep", help="directory for the runs, runs.csv and the plot"),
    data: str = typer.Option("", help="token shard directory (default: byte-level stdlib shards)"),
    dims: str = typer.Option("32,48,64,96", help="model widths, comma-separated"),
    steps: str = typer.Option("50,100,200", help="training steps per run, comma-separated"),
    layers: int = typer.Option(2, min=1),
    seq_len: int = typer.Option(64, min=1),
    micro_batch: int = typer.Option(8, min=1),
    lr: float = typer.Option(3e-3, help="peak learning rate (positive)"),
    bootstrap: int = typer.Option(100, min=0),
):
    """Train a grid of tiny models on CPU with the pretraining loop, then fit L(N, D) to them."""
    from lmforge.plan.sweep import SweepConfig, run_sweep
    if not 0 < lr < float("inf"):
        raise LmforgeError(f"--lr must be a positive finite number, got {lr}")
    if Path(out).exists() and not Path(out).is_dir():
        raise LmforgeError(f"--out {out} is a file; give a directory")
    console = Console()
    cfg = SweepConfig(out=out, data=data, dims=_ints(dims, "--dims"), steps=_ints(steps, "--steps"),
                      n_layers=layers, seq_len=seq_len, micro_batch=micro_batch, lr=lr)
    _, csv_path = run_sweep(cfg, console)
    console.print(f"runs: {csv_path}")
    _report_fit(csv_path, None, "", bootstrap, str(Path(out) / "law.json"), False, False, 0, console)


def register(app: typer.Typer) -> None:
    app.add_typer(plan_app, name="plan")
    app.add_typer(scaling_app, name="scaling")
