"""Does GRPO teach? Held-out exact match on arithmetic before and after GRPO, with a control.

    python benchmarks/grpo_gain.py [--seeds 0,1,2] [--grpo-steps 1500] [--json PATH]

Per seed: a small random Llama (dim 128, 4 layers; a byte-level BPE tokenizer that keeps every digit
its own token, with the ChatML template) is SFT'd on generated additions of operands 0-99
(`lmforge finetune sft` on a JSONL of chats), in stages of 250 steps until it answers >= 30 % of
200 *training* questions right (greedy), so groups have reward variance; then two GRPO runs start from that SFT model with the same settings
and seeds (`lmforge finetune grpo`, exact-match reward, k3 KL to the SFT weights):
- real: rewarded for the right answer;
- control: rewarded for one fixed wrong answer per question (see `wrong_answer_reward`),
  which carries no information about correctness, so it must not gain.
Reported: held-out exact match (greedy; questions over the ~1,000 operand pairs, 10 %, that are
never trained on) of the SFT start, after GRPO and after the control, the KL to the start at the
last step, the win-rate against the start (held-out questions the trained model gets right and the
start wrong, and the reverse) and the CPU time of each GRPO run (process time, torch on --threads
threads). Digit tokens matter: with whole numbers as tokens (--no-split-digits) every operand pair
is its own lookup and what GRPO teaches on trained pairs does not carry over to held-out ones.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from common import write_json
from lmforge.align.grpo import GRPOConfig, GRPOObjective, GRPORecipe, finetune_grpo
from lmforge.align.rollouts import greedy_rollouts
from lmforge.align.sft import SFTRecipe, finetune_sft, pad_token_id
from lmforge.align.tasks import Task, arithmetic_tasks, exact_match_reward
from lmforge.config import load_recipe
from lmforge.model import ModelConfig, Transformer, load, save
from lmforge.tokenizer import load_tokenizer, train_tokenizer


def start_model(out: Path, seed: int, max_operand: int, dim: int, layers: int, split_digits: bool) -> Path:
    texts = [f"{t.prompt} {t.answer}" for t in arithmetic_tasks(2000, 0, "train", max_operand)]
    tok = train_tokenizer(texts, vocab_size=400, min_frequency=1, split_digits=split_digits)
    torch.manual_seed(seed)
    net = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2,
                                  hidden_dim=dim * 3, max_seq_len=64))
    save(net, out, tokenizer=tok)
    return out


def held_out(model_dir: Path, max_operand: int, n_val: int, split: str = "val", seed: int = 0) -> torch.Tensor:
    """Greedy exact match per question of `split`, 0/1 (the rollouts of the objective's own evaluation)."""
    tok = load_tokenizer(model_dir)
    cfg = GRPOConfig(max_operand=max_operand, max_tokens=4, val_tasks=n_val)
    val = arithmetic_tasks(n_val, seed, split, max_operand)
    obj = GRPOObjective(tok, [], val, cfg, 1, pad_token_id(tok))
    return greedy_rollouts(load(model_dir).eval(), tok, obj.val_ids, val, max_tokens=4, pad_id=obj.pad_id,
                           reward_fn=exact_match_reward, autocast=lambda: torch.autocast("cpu", enabled=False)).rewards


def wrong_answer_reward(max_operand: int):
    """Reward for one fixed wrong answer per question: answer + 1 + (7 * answer mod (n - 1)), mod n,
    differs from the answer by 1..n-1, so the rewarded answer is never the right one."""
    n = 2 * max_operand + 1

    def reward(text: str, task: Task) -> float:
        return exact_match_reward(text, Task(task.prompt, (task.answer + 1 + (task.answer * 7) % (n - 1)) % n))
    return reward


def run_seed(root: Path, seed: int, args, quiet: Console) -> dict:
    start = start_model(root / f"start{seed}", seed, args.max_operand, args.dim, args.layers, args.split_digits)
    chats = root / f"chats{seed}.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t.prompt},
                                                      {"role": "assistant", "content": str(t.answer)}]}) + "\n"
                             for t in arithmetic_tasks(args.sft_examples, seed, "train", args.max_operand)))
    # SFT in stages until greedy exact match on *training* questions reaches --sft-target (the held-out
    # questions play no part in choosing the start): learning is abrupt here, one stage can take the
    # model from ~10 % to ~95 %, so a fixed step count gives a start with nothing left to learn on some
    # seeds and nothing learnt on others.
    model, probes = start, []
    for stage in range(args.sft_stages):
        sft_out = root / f"sft{seed}-{stage}"
        finetune_sft(load_recipe(SFTRecipe, None, [
            f"train.out={sft_out}", "train.seq_len=64", "train.micro_batch=32", "train.global_batch_tokens=2048",
            f"train.max_steps={args.sft_steps}", f"train.lr={args.sft_lr}", "train.warmup=0.05",
            "train.tensorboard=false", f"train.eval_every={10**6}", f"train.ckpt_every={10**6}", "train.log_every=50",
            f"train.seed={seed + stage}", f"sft.data={chats}", f"sft.max_examples={args.sft_examples}"]),
            str(model), console=quiet)
        model = sft_out / "model"
        probes.append(float(held_out(model, args.max_operand, 200, "train", seed + 1).mean()))
        if probes[-1] >= args.sft_target:
            break
    start_right = held_out(model, args.max_operand, args.val)
    before = float(start_right.mean())
    result = {"seed": seed, "sft_exact_match": before, "sft_train_probes": probes, "sft_total_steps": len(probes) * args.sft_steps}
    for name, reward in (("grpo", None), ("control", wrong_answer_reward(args.max_operand))):
        out = root / f"{name}{seed}"
        t0 = time.process_time()
        finetune_grpo(load_recipe(GRPORecipe, None, [
            f"train.out={out}", "train.seq_len=64", f"train.micro_batch={args.prompts}",
            f"train.global_batch_tokens={64 * args.prompts}", f"train.max_steps={args.grpo_steps}",
            f"train.lr={args.lr}", "train.warmup=0.05", "train.weight_decay=0", "train.tensorboard=false",
            f"train.eval_every={10**6}", f"train.ckpt_every={10**6}", "train.log_every=1", f"train.seed={seed}",
            f"grpo.group_size={args.group}", "grpo.max_tokens=4", "grpo.temperature=1.0", "grpo.aggregation=dapo",
            f"grpo.beta={args.beta}", f"grpo.max_operand={args.max_operand}", f"grpo.val_tasks={args.val}",
            "grpo.chat=true"]), str(model), console=quiet, reward_fn=reward)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "reward_mean" in r]
        right = held_out(out / "model", args.max_operand, args.val)
        result[name] = {"exact_match": float(right.mean()),
                        "wins": float((right * (1 - start_right)).mean()), "losses": float((start_right * (1 - right)).mean()),
                        "kl_last": steps[-1]["kl"], "train_reward_first10": statistics.mean(r["reward_mean"] for r in steps[:10]),
                        "train_reward_last10": statistics.mean(r["reward_mean"] for r in steps[-10:]),
                        "cpu_s": time.process_time() - t0}
    result["gain_points"] = 100 * (result["grpo"]["exact_match"] - before)
    result["control_gain_points"] = 100 * (result["control"]["exact_match"] - before)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sft-steps", type=int, default=250, help="steps per SFT stage")
    ap.add_argument("--sft-stages", type=int, default=16, help="most SFT stages")
    ap.add_argument("--sft-target", type=float, default=0.3,
                    help="stop SFT once greedy exact match on 200 training questions reaches this")
    ap.add_argument("--sft-lr", type=float, default=0.002)
    ap.add_argument("--sft-examples", type=int, default=20000)
    ap.add_argument("--grpo-steps", type=int, default=1500)
    ap.add_argument("--max-operand", type=int, default=99)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per GRPO step")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.0003)
    ap.add_argument("--beta", type=float, default=0.02)
    ap.add_argument("--split-digits", action=argparse.BooleanOptionalAction, default=True,
                    help="one token per digit (numbers read digit by digit)")
    ap.add_argument("--val", type=int, default=400, help="held-out questions")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is summed over them)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet = Console(quiet=True)
    results = []
    with tempfile.TemporaryDirectory() as d:
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run_seed(Path(d), seed, args, quiet)
            results.append(r)
            print(f"seed {seed}: SFT {r['sft_total_steps']} steps (train probe {100 * r['sft_train_probes'][-1]:.0f}%); "
                  f"held-out exact match SFT start {100 * r['sft_exact_match']:.1f}% -> GRPO "
                  f"{100 * r['grpo']['exact_match']:.1f}% ({r['gain_points']:+.1f} points, KL {r['grpo']['kl_last']:.4f}, "
                  f"{r['grpo']['cpu_s'] / 60:.1f} CPU-min; train reward {r['grpo']['train_reward_first10']:.2f} -> "
                  f"{r['grpo']['train_reward_last10']:.2f}; vs start: {100 * r['grpo']['wins']:.1f}% won, "
                  f"{100 * r['grpo']['losses']:.1f}% lost); wrong-answer control "
                  f"{100 * r['control']['exact_match']:.1f}% ({r['control_gain_points']:+.1f} points)", flush=True)
    gains = [r["gain_points"] for r in results]
    controls = [r["control_gain_points"] for r in results]
    print(f"mean gain {statistics.mean(gains):+.1f} points (control {statistics.mean(controls):+.1f}) over "
          f"{len(results)} seed(s); target >= +15 within 30 CPU-minutes")
    write_json(args.json, "grpo_gain", vars(args), {"runs": results},
               {"mean_gain_points": statistics.mean(gains), "mean_control_gain_points": statistics.mean(controls)})


if __name__ == "__main__":
    main()
