"""Our training step vs transformers.LlamaForCausalLM with the same config, in the same run.

    python benchmarks/train_step.py [--preset tiny] [--batch 16] [--seq 256] [--steps 10] [--json PATH]

Prints milliseconds per step (forward + backward + AdamW) for both, median (min-max) over --steps
interleaved steps (one step of each per round, the order rotating each round), and the median
per-round ratio ours/HF (target <= 0.8). Both models get identical weights; their first-step
losses are printed too.
"""
from __future__ import annotations

import argparse

import torch
import transformers

from common import fmt, interleave, inverse, ratios, spread, write_json
from lmforge.model import Transformer, preset, save_hf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model (GPU path)")
    ap.add_argument("--json", help="also write config, per-step timings and summary here")
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

    first = {"ours": step_ours().item(), "hf": step_hf().item()}
    print(f"first-step loss: ours {first['ours']:.5f}  hf {first['hf']:.5f}")
    for _ in range(2):  # warm-up (and compile)
        step_ours(), step_hf()
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times, _ = interleave({"ours": step_ours, "transformers": step_hf}, args.steps, sync)
    s_ours, s_hf = spread(times["ours"]), spread(times["transformers"])
    ratio = ratios(times["ours"], times["transformers"])
    tokens = args.batch * args.seq
    print(f"preset {args.preset}, batch {args.batch}x{args.seq}, device {device}, threads {torch.get_num_threads()}, "
          f"{args.steps} interleaved steps each, median (min-max)")
    print(f"ours {fmt(s_ours, 1e3, 1)} ms/step ({fmt(inverse(s_ours, tokens), digits=0)} tok/s)")
    print(f"transformers {fmt(s_hf, 1e3, 1)} ms/step ({fmt(inverse(s_hf, tokens), digits=0)} tok/s)")
    print(f"ratio ours/hf = {fmt(ratio, digits=3)} per step pair  (target <= 0.8)")
    write_json(args.json, "train_step",
               {"preset": args.preset, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                "device": str(device), "compile": args.compile, "bf16_autocast": bf16},
               {"ours_s": times["ours"], "transformers_s": times["transformers"], "first_step_loss": first},
               {"ours_s": s_ours, "transformers_s": s_hf, "ours_tokens_per_s": inverse(s_ours, tokens),
                "transformers_tokens_per_s": inverse(s_hf, tokens), "ratio_ours_over_hf": ratio})

if __name__ == "__main__":
    main()
