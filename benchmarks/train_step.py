"""Our training step vs transformers.LlamaForCausalLM with the same config, in the same run.

    python benchmarks/train_step.py [--preset tiny] [--batch 16] [--seq 256] [--steps 10] [--compile] [--json PATH]

Prints milliseconds per step (forward + backward + AdamW) for both, median (min-max) over --steps
interleaved steps (one step of each per round, the order rotating each round), and the median
per-round ratio ours/HF (target <= 0.8). Both models get identical weights; their first-step
losses are printed too. --compile adds a third side, our model under torch.compile (a copy with
the same weights and its own optimizer), with its own ratio to HF.
"""
from __future__ import annotations

import argparse
import copy

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
    ap.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
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
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    x, y = batch[:, :-1], batch[:, 1:]
    fused = device.type == "cuda"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    def stepper(model, loss_fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

        def step():
            with autocast():
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step

    # ours: the trainer's path, the loss fused with the LM head; transformers: its own training path
    sides = {"ours": stepper(ours, lambda: ours(x, targets=y)),
             "transformers": stepper(hf, lambda: hf(input_ids=x, labels=x).loss)}
    if args.compile:
        twin = copy.deepcopy(ours)
        compiled = torch.compile(twin)
        sides["ours_compiled"] = stepper(twin, lambda: compiled(x, targets=y))
    first = {name: step().item() for name, step in sides.items()}
    print("first-step loss: " + "  ".join(f"{n} {v:.5f}" for n, v in first.items()))
    for _ in range(2):  # warm-up (and compile)
        for step in sides.values():
            step()
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times, _ = interleave(sides, args.steps, sync)
    summary = {}
    tokens = args.batch * args.seq
    print(f"preset {args.preset}, batch {args.batch}x{args.seq}, device {device}, threads {torch.get_num_threads()}, "
          f"{args.steps} interleaved steps each, median (min-max)")
    for name in sides:
        s = spread(times[name])
        summary[f"{name}_s"], summary[f"{name}_tokens_per_s"] = s, inverse(s, tokens)
        print(f"{name} {fmt(s, 1e3, 1)} ms/step ({fmt(inverse(s, tokens), digits=0)} tok/s)")
    for name in [n for n in sides if n != "transformers"]:
        summary[f"ratio_{name}_over_hf"] = ratio = ratios(times[name], times["transformers"])
        print(f"ratio {name}/hf = {fmt(ratio, digits=3)} per step pair  (target <= 0.8)")
    write_json(args.json, "train_step",
               {"preset": args.preset, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                "device": str(device), "compile": args.compile, "bf16_autocast": bf16},
               {**{f"{n}_s": t for n, t in times.items()}, "first_step_loss": first}, summary)


if __name__ == "__main__":
    main()
