"""bf16 autocast on CPU against fp32, same weights, same run: training step, prefill, decode, and
what it does to the loss.

    python benchmarks/cpu_bf16.py [--preset tiny] [--batch 16] [--seq 256] [--rounds 5] [--json PATH]

Times (median, min-max over interleaved rounds): one training step (forward + backward + AdamW),
a prefill forward over batch x seq tokens, and 32 single-token decode steps with the KV cache;
prints the per-round ratio bf16/fp32 (below 1: bf16 is faster). Quality: the held-out-style loss
of the same weights on the same random-token-free batch (stdlib text) in both precisions.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from common import fmt, interleave, ratios, spread, write_json
from lmforge.corpus.stdlib import stdlib_documents
from lmforge.model import Transformer, preset
from lmforge.model.kv_cache import KVCache


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def text_batch(vocab: int, batch: int, seq: int) -> torch.Tensor:
    """Bytes of stdlib source folded into the vocabulary: real, repetitive text, no tokenizer needed."""
    data = "".join(d.text for d in stdlib_documents(limit=40)).encode()[: batch * (seq + 1)]
    ids = torch.tensor(list(data), dtype=torch.long) % vocab
    return ids.view(batch, seq + 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = preset(args.preset, max_seq_len=max(args.seq + 64, 256))
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = text_batch(cfg.vocab_size, args.batch, args.seq)
    x, y = batch[:, :-1], batch[:, 1:]

    def train_step(bf16):
        with autocast(bf16):
            loss = model(x, targets=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def prefill(bf16):
        with autocast(bf16):
            model(x)

    @torch.no_grad()
    def decode(bf16):
        cache = KVCache(cfg, 1, max_len=x.size(1) + 40)
        with autocast(bf16):
            logits = model(x[:1, :8], cache=cache)
            tok = logits[:, -1:].argmax(-1)
            for _ in range(32):
                tok = model(tok, cache=cache)[:, -1:].argmax(-1)

    results = {}
    for name, fn in (("train_step", train_step), ("prefill", prefill), ("decode_32", decode)):
        times, _ = interleave({"fp32": lambda: fn(False), "bf16": lambda: fn(True)}, args.rounds)
        results[name] = {"fp32": spread(times["fp32"]), "bf16": spread(times["bf16"]),
                         "ratio_bf16_over_fp32": ratios(times["bf16"], times["fp32"]), "raw": times}
        print(f"{name:>10}: fp32 {fmt(results[name]['fp32'], 1e3, 1, ' ms')}, "
              f"bf16 {fmt(results[name]['bf16'], 1e3, 1, ' ms')}, bf16/fp32 {fmt(results[name]['ratio_bf16_over_fp32'])}")
    with torch.no_grad():
        losses = {}
        for bf16 in (False, True):
            with autocast(bf16):
                losses["bf16" if bf16 else "fp32"] = float(model(x, targets=y))
    print(f"      loss: fp32 {losses['fp32']:.5f}, bf16 {losses['bf16']:.5f} "
          f"(difference {losses['bf16'] - losses['fp32']:+.5f} nats/token)")
    write_json(args.json, "cpu_bf16", vars(args), {k: v.pop("raw") for k, v in results.items()},
               {**results, "loss": losses})


if __name__ == "__main__":
    main()
