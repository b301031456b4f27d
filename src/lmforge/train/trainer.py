"""The training loop (`fit`), shared by every objective, and pretraining (`train`) on top of it."""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console

from lmforge.config import to_dict
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer, load, save
from lmforge.model.pretrained import resolve_model_path
from lmforge.outputs import claim_output_dir
from lmforge.train.checkpoint import latest_checkpoint
from lmforge.train.config import ParallelConfig, TrainConfig, TrainRecipe
from lmforge.train.distributed.runtime import resolve_device, start_runtime  # noqa: F401 (resolve_device: re-exported)
from lmforge.train.metrics import (
    MetricsLogger,
    device_peak_flops,
    peak_memory_bytes,
    plot_loss_curve,
    read_metrics,
)
from lmforge.train.muon import Muon, is_hidden_matrix
from lmforge.train.noise_scale import NoiseScaleTracker, noise_scale
from lmforge.train.objective import (  # noqa: F401 (evaluate_loss: re-exported)
    Objective,
    PretrainObjective,
    evaluate_loss,
    finish_model,
    prepare_model,
    to_device,
)
from lmforge.train.schedule import lr_at

TRAIN_FILES = ["recipe.yaml", "metrics.jsonl", "ckpt", "model", "adapter", "tensorboard", "loss_curve.png"]


def build_optimizer(model: Transformer, tc: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (or Muon for the hidden matrices, see train/muon.py) over the trainable parameters
    (frozen ones, e.g. a LoRA base, get no state), with weight decay on matrices only (not norms);
    fused AdamW kernels on CUDA."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for _, p in named if p.dim() < 2]
    if tc.optimizer == "muon":
        hidden = [p for n, p in named if is_hidden_matrix(n, p)]
        other = [p for n, p in named if p.dim() >= 2 and not is_hidden_matrix(n, p)]
        groups = [{"params": hidden, "muon": True, "lr_mult": tc.muon_lr / tc.lr if tc.lr else 0.0,
                   "weight_decay": tc.weight_decay},
                  {"params": other, "weight_decay": tc.weight_decay}, {"params": no_decay}]
        return Muon([g for g in groups if g["params"]], lr=tc.lr, betas=(tc.beta1, tc.beta2),
                    momentum=tc.muon_momentum)
    decay = [p for _, p in named if p.dim() >= 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8,
                             fused=device.type == "cuda")


def grad_sq_norm(model) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.stack(torch._foreach_norm(grads)).pow(2).sum())


def accumulate_gradients(objective: Objective, model, forward, micros: list, device, autocast,
                         first_grad_sq: bool = False) -> tuple[torch.Tensor, dict, list[int], float | None]:
    """Backward of one optimizer step's micro-batches into .grad, each micro-batch's mean loss
    weighted by its share of the step's loss tokens (w == 1 when all are equal, so the usual
    loss / grad_accum is unchanged): any split into micro-batches gives the same mean.
    -> (sum of w * loss, to divide by len(micros); token-weighted sums of the extra metrics;
    loss tokens per micro-batch; the first micro-batch's own squared gradient norm if asked)."""
    k = len(micros)
    counts = [objective.loss_tokens(batch) for batch in micros]
    n_step = max(sum(counts), 1)
    loss_sum = None
    extra_sums: dict[str, float] = {}
    g2_small = None
    for micro, batch in enumerate(micros):
        with autocast():
            loss, extra = objective.loss(forward, to_device(batch, device))
            if model.cfg.n_experts:
                loss = loss + model.cfg.moe_aux_loss_coef * model.aux_loss()
        w = counts[micro] * k / n_step
        (loss * w / k).backward()
        if loss_sum is None:  # fp32 (also under bf16 autocast), fp64 for an fp64 model
            loss_sum = torch.zeros((), device=device, dtype=torch.promote_types(loss.dtype, torch.float32))
        loss_sum += loss.detach() * w
        for name, v in extra.items():
            extra_sums[name] = extra_sums.get(name, 0.0) + v * counts[micro]
        if first_grad_sq and micro == 0:
            g2_small = grad_sq_norm(model) * (k / w) ** 2
    return loss_sum, extra_sums, counts, g2_small


def _truncate_metrics(path: Path, last_step: int) -> None:
    """After a resume, drop metric rows logged after the checkpoint (they will be redone), and a
    last line cut short by a kill mid-write."""
    if path.exists():
        lines = path.read_text().split("\n")
        complete = [line for line in lines[:-1] if line.strip()]  # the part after the last newline is cut
        keep = [r for r in map(json.loads, complete) if r["step"] <= last_step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(path)


def train(recipe: TrainRecipe, resume: bool = False, console: Console | None = None) -> dict:
    """Pretraining: the loop below with the next-token objective on token shards."""
    tc = recipe.train
    recipe.model_config()  # fail fast on model config errors, before touching any data
    objective = PretrainObjective(tc.data, tc.seq_len, tc.eval_tokens, tc.micro_batch)
    cfg = None if tc.init_from else recipe.model_config(vocab_size=objective.vocab_size)
    if cfg is not None and cfg.vocab_size < objective.vocab_size:
        raise LmforgeError(f"model vocab_size {cfg.vocab_size} < tokenizer vocab {objective.vocab_size}")
    return fit(objective, tc, to_dict(recipe), cfg, "train", TRAIN_FILES, resume, console, recipe.parallel)


def initial_model(tc: TrainConfig, cfg: ModelConfig | None, vocab_size: int, device: torch.device) -> Transformer:
    """Random init from `cfg` (seeded by train.seed), or the weights named by train.init_from."""
    torch.manual_seed(tc.seed)
    dtype = torch.float64 if tc.dtype == "float64" else torch.float32
    if not tc.init_from:
        return Transformer(cfg).to(device=device, dtype=dtype)
    model = load(resolve_model_path(tc.init_from), dtype=dtype, device=device)
    if model.cfg.vocab_size < vocab_size:
        raise LmforgeError(f"train.init_from model has vocab_size {model.cfg.vocab_size} < the data's {vocab_size}")
    if tc.seq_len > model.cfg.max_seq_len:
        raise LmforgeError(f"train.seq_len={tc.seq_len} exceeds the init_from model's max_seq_len="
                           f"{model.cfg.max_seq_len}")
    return model


def fit(objective: Objective, tc: TrainConfig, recipe: dict, cfg: ModelConfig | None, kind: str,
        out_files: list[str], resume: bool = False, console: Console | None = None,
        parallel: ParallelConfig | None = None) -> dict:
    """The training loop for any objective: a model from `cfg` (random init) or `tc.init_from`,
    trained with the schedule, accumulation, clipping, logging and checkpoints of `tc`; the run
    folder tc.out is a `kind` output; resume continues bit for bit from the latest checkpoint.
    Under torchrun, `parallel` lays it over the processes: the `rt.` calls below are the only
    places that differ from one process (lmforge.train.distributed)."""
    for degree in ("pp", "cp"):
        if parallel is not None and getattr(parallel, degree) > 1 and not isinstance(objective, PretrainObjective):
            raise LmforgeError(f"parallel.{degree} runs pretraining (`lmforge train`) only so far")
    rt = start_runtime(parallel, tc, cfg, console or Console())
    try:
        return _fit(rt, objective, tc, recipe, cfg, kind, out_files, resume)
    finally:
        rt.close()


def _fit(rt, objective: Objective, tc: TrainConfig, recipe: dict, cfg: ModelConfig | None, kind: str,
         out_files: list[str], resume: bool) -> dict:
    console, device = rt.console, rt.device
    # Optional objective hook: the objective computes each step's gradient itself (DP-SGD).
    step_gradients = getattr(objective, "step_gradients", None)
    if tc.dp.enabled and step_gradients is None:
        raise LmforgeError("train.dp.enabled needs the DP-SGD objective: run `lmforge safety dp-train` "
                           "(or wrap the objective in lmforge.safety.dp_sgd.DPObjective)")
    use_bf16 = tc.dtype == "bfloat16" or (tc.dtype == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    model = initial_model(tc, cfg, objective.vocab_size, device)
    cfg = model.cfg
    plain_keys = set(model.state_dict())
    model = prepare_model(objective, model)
    # A model the objective froze or extended is checkpointed by its trainable parameters; the rest
    # is rebuilt from train.init_from by the same prepare_model on resume.
    trainable_only = (set(model.state_dict()) != plain_keys
                      or not all(p.requires_grad for p in model.parameters()))
    model.gradient_checkpointing = tc.activation_checkpointing
    model.z_loss = tc.z_loss  # read by the fused LM loss (targets=...): the logged loss includes it
    model = rt.parallelize(model)
    optimizer = build_optimizer(model, tc, device)
    loader = rt.shard(objective.batches(tc.micro_batch, tc.seed))
    out = Path(tc.out)
    ckpt_root = out / "ckpt"
    start_step, tokens_seen = 0, 0
    # B_simple from the first micro-batch's gradient (B_small) and the accumulated one (B_big).
    noise = NoiseScaleTracker() if tc.noise_scale else None
    if rt.main:
        claim_output_dir(out, kind, out_files)  # refuses a file or a user's non-empty folder
    rt.barrier()
    latest = latest_checkpoint(ckpt_root)
    if latest and not resume:
        raise LmforgeError(f"{out} already holds checkpoints (latest {latest.name}); pass --resume "
                           "to continue it, or choose another train.out")
    if resume and latest:
        state = rt.load_checkpoint(latest, model, optimizer)
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        loader.load_state_dict(state["loader"])
        if noise is not None and "noise_scale" in state:
            noise.__dict__.update(state["noise_scale"])
        if rt.main:
            _truncate_metrics(out / "metrics.jsonl", start_step)
        console.print(f"[cyan]resumed from step {start_step}[/] ({latest.name}); next step {start_step + 1}",
                      highlight=False)
    elif resume:
        if rt.main:
            _truncate_metrics(out / "metrics.jsonl", 0)
        console.print(f"no checkpoint in {ckpt_root}: starting at step 1", highlight=False)
    if rt.main:
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    forward = rt.wrap_forward(torch.compile(model) if tc.compile else model)
    flops_per_token = cfg.flops_per_token(tc.seq_len)
    peak = tc.peak_flops or device_peak_flops(device)
    logger = MetricsLogger(out, tc.tensorboard, console) if rt.main else None
    console.print(f"model {cfg.num_params() / 1e6:.2f}M params, {flops_per_token / 1e6:.1f} MFLOP/token, "
                  f"device {device}{' bf16' if use_bf16 else ''}, {tc.max_steps} steps x "
                  f"{tc.global_batch_tokens} tokens (grad accum {tc.grad_accum})")

    def checkpoint(step, loader_state=None):
        rt.save_checkpoint(ckpt_root, step, model, optimizer,
                        {"tokens_seen": tokens_seen, "loader": loader_state or loader.state_dict(),
                         **({"noise_scale": vars(noise)} if noise else {})}, tc.keep_last,
                        trainable_only=trainable_only)

    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    completed = start_step
    completed_loader = loader.state_dict()
    t_last, tokens_last = time.perf_counter(), tokens_seen
    val_loss = None
    try:
        for step in range(start_step, tc.max_steps):
            lr = lr_at(step, tc.max_steps, tc.lr, tc.schedule, tc.warmup, tc.decay, tc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micros = [loader.next_batch() for _ in range(tc.grad_accum)]
            if rt.pipeline is not None:  # the schedule runs the micro-batches through the stages
                loss_sum, extra_sums, counts, g2_small = rt.pipeline_gradients(objective, micros, autocast)
                grad_norm = rt.clip_grad_norm(trainable, tc.grad_clip)
            elif step_gradients is None:
                loss_sum, extra_sums, counts, g2_small = accumulate_gradients(
                    objective, model, forward, micros, device, autocast, first_grad_sq=noise is not None)
                grad_norm = rt.clip_grad_norm(trainable, tc.grad_clip)
            else:  # sets .grad, clipped and noised by the objective's own rule
                loss_sum, extra_sums, counts, grad_norm = step_gradients(model, micros, step, device, autocast)
            n_step = sum(counts)
            if noise is not None:
                noise.update(noise_scale(counts[0], g2_small, n_step, float(grad_norm) ** 2))
            optimizer.step()
            tokens_seen += n_step * rt.dp
            done = step + 1
            completed, completed_loader = done, loader.state_dict()  # what an interrupt may save
            optimizer.zero_grad(set_to_none=True)
            loss_value = rt.mean(loss_sum).item() / tc.grad_accum
            if not math.isfinite(loss_value):
                raise LmforgeError(f"loss became {loss_value} at step {done}; lower train.lr or check the data")
            if done % tc.log_every == 0 or done == tc.max_steps:
                now = time.perf_counter()
                tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, tokens_seen
                metrics = {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tps,
                           "tokens_seen": tokens_seen, "peak_mem_mb": peak_memory_bytes(device) / 2**20,
                           **{k: v / max(n_step, 1) for k, v in extra_sums.items()}}
                if peak:
                    metrics["mfu"] = flops_per_token * tps / peak
                if noise is not None:
                    metrics["noise_scale_tokens"] = noise.b_simple
                if logger:
                    logger.log(done, metrics)
            if done % tc.eval_every == 0 or done == tc.max_steps:
                eval_model = rt.eval_model(model)  # collective; None on ranks that do not evaluate
                held_out = objective.evaluate(eval_model, autocast) if eval_model is not None else {}
                if held_out and logger:
                    val_loss = held_out.get("val_loss", val_loss)
                    logger.log(done, held_out)
            if done % tc.ckpt_every == 0 or done == tc.max_steps:
                checkpoint(done)
    except KeyboardInterrupt:
        # the last step whose update is in the weights, with the loader just past its batches
        console.print(f"[yellow]interrupted: saving a checkpoint at step {completed}[/]")
        if completed > start_step:
            checkpoint(completed, completed_loader)
        raise
    finally:
        if logger:
            logger.close()
    final, extra_files = finish_model(objective, rt.full_model(model), out)
    if rt.main:
        save(final, out / "model", tokenizer=objective.tokenizer(), extra_files=extra_files)
        plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
    rt.barrier()
    last = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in last if "loss" in r]
    return {"steps": tc.max_steps, "tokens_seen": tokens_seen, "final_loss": losses[-1] if losses else None,
            "val_loss": val_loss, "model_dir": str(out / "model"), "params": cfg.num_params(),
            "flops_per_token": flops_per_token}
