"""Finetuning steps, ours against peers in the same run:

    python benchmarks/align.py [--steps 6] [--rounds 2] [--json PATH]

- LoRA vs full finetune (our SFT objective through the training loop's accumulation): seconds per
  optimizer step and the training state it keeps (gradients + AdamW moments, bytes measured on the
  tensors; on CUDA also the peak allocated memory of the step).
- DPO: our `finetune dpo` step (reference log-probs precomputed once and cached) vs TRL's
  DPOTrainer step, with its default per-step reference forward and with precompute_ref_log_probs.
- GRPO: our `finetune grpo` step (group rollouts through our serving engine, one engine pass per
  step with the prompt's KV blocks shared across its group) vs TRL's GRPOTrainer step (rollouts with
  transformers' generate), same prompts per step, group size, completion limit, loss (dapo, beta 0).

Every side trains the same tiny random Llama (saved as an lmforge checkpoint and in Hugging Face
format) with the bundled SmolLM2 tokenizer (49,152 tokens), on the same data, batch and config.
Step seconds are medians over steps 2..N of each run (step 1 warms up); each round runs every side
once, the order rotating (common.interleave); ratios are peer / ours per round.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import fmt, interleave, ratios, spread, write_json
from rich.console import Console

from lmforge.align.data import stdlib_chats
from lmforge.align.finetune_config import LoraSettings
from lmforge.align.lora import apply_lora
from lmforge.align.preference_data import stdlib_pairs
from lmforge.align.sft import SFTObjective, build_examples
from lmforge.train.examples import collate
from lmforge.align.tasks import arithmetic_tasks
from lmforge.gguf_file import bundled_smollm2
from lmforge.model import ModelConfig, Transformer, save, save_hf
from lmforge.tokenizer import load_tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import accumulate_gradients, build_optimizer


def make_models(root: Path, dim: int, layers: int):
    tok = load_tokenizer(bundled_smollm2())
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2,
                      hidden_dim=dim * 3, max_seq_len=512)
    net = Transformer(cfg)
    save(net, root / "lmforge", tokenizer=tok)
    save_hf(net, root / "hf", tokenizer=tok)
    return tok, cfg


class LogClock:
    """A file for our loop's console: the wall time at which each "step N" metrics line is printed
    (log_every=1: right after each optimizer step), so step times include everything the loop does.
    Held-out lines ("step N  val_…", printed after the last step's metrics) are not step ends."""

    def __init__(self):
        self.ends: list[float] = []

    def write(self, text: str) -> int:
        if text.lstrip().startswith("step ") and "  loss " in text:
            self.ends.append(time.perf_counter())
        return len(text)

    def flush(self):
        pass

    def seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]  # steps 2..N


class StepClock:
    """A transformers TrainerCallback: wall time between consecutive optimizer steps' ends."""

    def __init__(self):
        self.ends: list[float] = []

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, *a, **k):
        self.ends = [time.perf_counter()]

    def on_step_end(self, *a, **k):
        self.ends.append(time.perf_counter())

    def seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.ends[1:], self.ends[2:])]  # steps 2..N


def trl_common(out: Path, steps: int, batch: int) -> dict:
    return {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
                "learning_rate": 1e-5, "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0, "logging_steps": 10**6,
                "save_strategy": "no", "report_to": "none", "use_cpu": not torch.cuda.is_available(), "bf16": False,
                "dataloader_num_workers": 0, "seed": 0, "disable_tqdm": True}


# --- LoRA vs full -----------------------------------------------------------------------------------
def lora_vs_full(root: Path, tok, seq: int, batch: int, rounds: int, steps: int) -> dict:
    from lmforge.model import load
    chats = stdlib_chats("train")
    examples, _ = build_examples(tok, chats, seq + 1, batch * steps)
    objective = SFTObjective(tok, examples, [], batch)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tc = TrainConfig(lr=1e-4, seq_len=seq, micro_batch=batch, global_batch_tokens=seq * batch)
    sides, state = {}, {}
    for name in ("full", "lora"):
        net = load(root / "lmforge", dtype=torch.float32, device=device)
        if name == "lora":
            s = LoraSettings(r=8, alpha=16)
            net = apply_lora(net, s.r, s.alpha, s.dropout, s.target_modules, s.rslora, None)
        opt = build_optimizer(net, tc, device)
        batches = [collate(examples[i * batch:(i + 1) * batch], objective.pad_id) for i in range(steps)]

        def one_step(net=net, opt=opt, batches=batches, counter=[0]):  # noqa: B006 (a per-side step counter)
            b = batches[counter[0] % len(batches)]
            counter[0] += 1
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            accumulate_gradients(objective, net, net, [b], device, contextlib.nullcontext)
            opt.step()
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
            kept = sum(p.grad.numel() * p.grad.element_size() for p in net.parameters() if p.grad is not None)
            kept += sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                        if torch.is_tensor(t) and t.dim() > 0)
            opt.zero_grad(set_to_none=True)
            return {"state_bytes": kept, "peak_bytes": peak,
                    "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad)}
        sides[name] = one_step
        one_step()  # warm-up
    times, last = interleave(sides, rounds * steps)
    state = {k: v for k, v in last.items()}
    return {"seconds": {k: spread(v) for k, v in times.items()}, "raw": times, "state": state,
            "ratio_full_over_lora": ratios(times["full"], times["lora"])}


# --- DPO ---------------------------------------------------------------------------------------------
def dpo_sides(root: Path, tok, seq: int, batch: int, steps: int, runs: Path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from lmforge.align.dpo import DPORecipe, finetune_dpo
    from lmforge.align.preference_data import tokenize_pair
    from lmforge.config import load_recipe

    kept = []  # the same pairs for both sides: the first that fit seq + 1 tokens with our tokenisation
    for p in stdlib_pairs("train", 0):
        e = tokenize_pair(tok, p)
        if len(e.prompt) + max(len(e.chosen), len(e.rejected)) <= seq + 1:
            kept.append(p)
        if len(kept) == batch * steps:
            break
    data = runs / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in kept))
    hf_tok = AutoTokenizer.from_pretrained(root / "hf")
    hf_tok.pad_token = hf_tok.pad_token or hf_tok.eos_token
    dataset = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in kept])
    counter = {"n": 0}

    def ours():
        counter["n"] += 1
        out = runs / f"dpo-ours-{counter['n']}"
        recipe = load_recipe(DPORecipe, None, [
            f"train.out={out}", f"train.seq_len={seq}", f"train.micro_batch={batch}",
            f"train.global_batch_tokens={seq * batch}", f"train.max_steps={steps}", "train.lr=0.00001",
            "train.schedule=wsd", "train.decay=0", "train.warmup=0", "train.weight_decay=0", "train.log_every=1",
            f"train.eval_every={10**6}", f"train.ckpt_every={10**6}", "train.tensorboard=false",
            f"dpo.data={data}", f"dpo.max_examples={len(kept)}", "dpo.beta=0.1"])
        clock = LogClock()
        finetune_dpo(recipe, str(root / "lmforge"), console=Console(file=clock, width=400))
        return clock.seconds()

    def trl(precompute: bool):
        def run():
            counter["n"] += 1
            model = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)
            clock = StepClock()
            args = DPOConfig(**trl_common(runs / f"dpo-trl-{counter['n']}", steps, batch), beta=0.1,
                             loss_type=["sigmoid"], max_length=seq + 1, precompute_ref_log_probs=precompute)
            DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=hf_tok,
                       callbacks=[clock]).train()
            return clock.seconds()
        return run
    return {"ours": ours, "trl": trl(False), "trl_precomputed_ref": trl(True)}


# --- GRPO --------------------------------------------------------------------------------------------
def grpo_sides(root: Path, tok, prompts: int, group: int, max_tokens: int, steps: int, runs: Path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from lmforge.align.grpo import GRPORecipe, finetune_grpo
    from lmforge.align.tasks import first_integer
    from lmforge.config import load_recipe

    tasks = arithmetic_tasks(2000, 0, "train")
    hf_tok = AutoTokenizer.from_pretrained(root / "hf")
    hf_tok.pad_token = hf_tok.pad_token or hf_tok.eos_token
    dataset = Dataset.from_list([{"prompt": t.prompt, "answer": t.answer} for t in tasks])

    def exact_match(prompts, completions, answer, **kwargs):
        return [1.0 if first_integer(c) == a else 0.0 for c, a in zip(completions, answer)]
    counter = {"n": 0}
    seq = 32

    def ours():
        counter["n"] += 1
        out = runs / f"grpo-ours-{counter['n']}"
        recipe = load_recipe(GRPORecipe, None, [
            f"train.out={out}", f"train.seq_len={seq}", f"train.micro_batch={prompts}",
            f"train.global_batch_tokens={seq * prompts}", f"train.max_steps={steps}", "train.lr=0.00001",
            "train.schedule=wsd", "train.decay=0", "train.warmup=0", "train.weight_decay=0", "train.log_every=1",
            f"train.eval_every={10**6}", f"train.ckpt_every={10**6}", "train.tensorboard=false",
            f"grpo.group_size={group}", f"grpo.max_tokens={max_tokens}", "grpo.temperature=1.0",
            "grpo.aggregation=dapo", "grpo.scale=group", "grpo.beta=0", "grpo.chat=false", "grpo.val_tasks=1",
            "grpo.mask_truncated=true"])
        clock = LogClock()
        finetune_grpo(recipe, str(root / "lmforge"), console=Console(file=clock, width=400))
        return clock.seconds()

    def trl():
        counter["n"] += 1
        model = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)
        clock = StepClock()
        args = GRPOConfig(**trl_common(runs / f"grpo-trl-{counter['n']}", steps, prompts * group),
                          num_generations=group, max_completion_length=max_tokens, steps_per_generation=1,
                          temperature=1.0, beta=0.0, loss_type="dapo", scale_rewards="group",
                          mask_truncated_completions=True, use_vllm=False)
        GRPOTrainer(model=model, reward_funcs=exact_match, args=args, train_dataset=dataset,
                    processing_class=hf_tok, callbacks=[clock]).train()
        return clock.seconds()
    return {"ours": ours, "trl": trl}


def run_sides(sides: dict, rounds: int) -> tuple[dict, dict]:
    """Each side's whole run once per round (order rotating); -> (per-step seconds per side, per-round medians)."""
    per_step: dict[str, list[float]] = {k: [] for k in sides}
    medians: dict[str, list[float]] = {k: [] for k in sides}

    def wrap(name):
        def run():
            secs = sides[name]()
            per_step[name] += secs
            medians[name].append(statistics.median(secs))
        return run
    interleave({k: wrap(k) for k in sides}, rounds)
    return per_step, medians


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="chats (LoRA/full) and pairs (DPO) per step")
    ap.add_argument("--prompts", type=int, default=4, help="GRPO prompts per step")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--only", default="lora,dpo,grpo")
    ap.add_argument("--json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    only = set(args.only.split(","))
    summary, raw = {}, {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tok, cfg = make_models(root, args.dim, args.layers)
        print(f"model: random Llama dim {args.dim}, {args.layers} layers, vocab {cfg.vocab_size} "
              f"({cfg.num_params() / 1e6:.1f}M params); torch threads {torch.get_num_threads()}")
        if "lora" in only:
            r = lora_vs_full(root, tok, args.seq, args.batch, args.rounds, args.steps)
            summary["lora_vs_full"] = {k: v for k, v in r.items() if k != "raw"}
            raw["lora_vs_full"] = r["raw"]
            st = r["state"]
            print(f"LoRA r=8 vs full, SFT step of {args.batch} x {args.seq}: full {fmt(r['seconds']['full'], 1e3, 0)} ms, "
                  f"LoRA {fmt(r['seconds']['lora'], 1e3, 0)} ms, full/LoRA {fmt(r['ratio_full_over_lora'])}x; "
                  f"trainable {st['full']['trainable'] / 1e6:.2f}M vs {st['lora']['trainable'] / 1e6:.3f}M params; "
                  f"grads + AdamW state {st['full']['state_bytes'] / 2**20:.1f} MiB vs "
                  f"{st['lora']['state_bytes'] / 2**20:.2f} MiB")
        if "dpo" in only:
            runs = root / "dpo"
            runs.mkdir()
            per_step, medians = run_sides(dpo_sides(root, tok, args.seq, args.batch, args.steps, runs), args.rounds)
            summary["dpo"] = {"seconds": {k: spread(v) for k, v in per_step.items()},
                              "ratio_trl_over_ours": ratios(medians["trl"], medians["ours"]),
                              "ratio_trl_precomputed_over_ours": ratios(medians["trl_precomputed_ref"], medians["ours"])}
            raw["dpo"] = per_step
            s = summary["dpo"]
            print(f"DPO step, {args.batch} pairs <= {args.seq} tokens: ours {fmt(s['seconds']['ours'], 1e3, 0)} ms, "
                  f"TRL {fmt(s['seconds']['trl'], 1e3, 0)} ms (x{s['ratio_trl_over_ours']['median']:.2f}), "
                  f"TRL precompute_ref_log_probs {fmt(s['seconds']['trl_precomputed_ref'], 1e3, 0)} ms "
                  f"(x{s['ratio_trl_precomputed_over_ours']['median']:.2f}); target >= 1.5x")
        if "grpo" in only:
            runs = root / "grpo"
            runs.mkdir()
            per_step, medians = run_sides(grpo_sides(root, tok, args.prompts, args.group, args.max_tokens, args.steps,
                                                     runs), args.rounds)
            summary["grpo"] = {"seconds": {k: spread(v) for k, v in per_step.items()},
                               "ratio_trl_over_ours": ratios(medians["trl"], medians["ours"])}
            raw["grpo"] = per_step
            s = summary["grpo"]
            print(f"GRPO step, {args.prompts} prompts x {args.group} completions <= {args.max_tokens} tokens: "
                  f"ours {fmt(s['seconds']['ours'], 1e3, 0)} ms, TRL {fmt(s['seconds']['trl'], 1e3, 0)} ms "
                  f"(x{s['ratio_trl_over_ours']['median']:.2f}); target >= 2x")
    write_json(args.json, "align", vars(args), raw, summary)


if __name__ == "__main__":
    main()
