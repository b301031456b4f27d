"""Our training step vs transformers.LlamaForCausalLM with the same config, in the same run.

    python benchmarks/train_step.py [--preset tiny] [--batch 16] [--seq 256] [--steps 10]

Prints milliseconds per step (forward + backward + AdamW) for both and the ratio ours/HF
(target <= 0.8). Both models get identical weights; their first-step losses are printed too.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from lmforge.model import Transformer, preset, save_hf


def timed_steps(step, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model (GPU path)")
    args = ap.parse_args()
    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    cfg = preset(args.preset, max_seq_len=max(args.seq, 256))
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        save_hf(ours, d)
        hf = transformers.LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa").to(device)
    hf.train()
    ours.train()
    fwd = torch.compile(ours) if args.compile else ours
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    x, y = batch[:, :-1], batch[:, 1:]
    fused = device.type == "cuda"
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=fused)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=fused)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    def step_ours():
        with autocast():
            loss = fwd(x, targets=y)  # the trainer's path: loss fused with the LM head
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss

    def step_hf():
        with autocast():
            loss = hf(input_ids=x, labels=x).loss  # transformers' own training path
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return loss

    print(f"first-step loss: ours {step_ours().item():.5f}  hf {step_hf().item():.5f}")
    for _ in range(2):  # warm-up (and compile)
        step_ours(), step_hf()
    t_ours, t_hf = [], []
    for _ in range(args.steps):  # interleave so both see the same machine load
        t_ours += timed_steps(step_ours, 1)
        t_hf += timed_steps(step_hf, 1)
    ours_ms, hf_ms = statistics.median(t_ours) * 1e3, statistics.median(t_hf) * 1e3
    tokens = args.batch * args.seq
    print(f"preset {args.preset}, batch {args.batch}x{args.seq}, device {device}, threads {torch.get_num_threads()}")
    print(f"ours {ours_ms:.1f} ms/step ({tokens / ours_ms * 1e3:,.0f} tok/s)   "
          f"transformers {hf_ms:.1f} ms/step ({tokens / hf_ms * 1e3:,.0f} tok/s)")
    print(f"ratio ours/hf = {ours_ms / hf_ms:.3f}  (target <= 0.8)")


if __name__ == "__main__":
    main()
