"""Decode speed of quantised weights on CPU: tokens/s at 1 and 16 concurrent streams.

    python benchmarks/quant.py                        # SmolLM2-135M-Instruct, 32 tokens, 3 rounds
    python benchmarks/quant.py --max-tokens 64 --repeat 5 --threads 2 --json quant.json

Sides, all in this one process, interleaved round by round (benchmarks/common.interleave):
  hf-fp32      transformers float32: one generate() for 1 stream, a left-padded static batch of 16
  ours-fp32    lmforge's serving engine (LLMEngine), float32 weights
  ours-int8    per-channel int8 weights (_weight_int8pack_mm while decoding)
  ours-int4    RTN int4 g128 asymmetric body + int8 LM head (_weight_int4pack_mm_for_cpu);
               AWQ/GPTQ checkpoints store the same layers, so they decode at the same speed
  ours-int4-old-prefill  (with --prefill-ab) the same model with prompts up to 256 rows through the
               dequantised float weight, as before they went through the int4 kernel
               (quantized.INT4_KERNEL_MAX_ROWS = KERNEL_MAX_ROWS = 32)
With --prefill-ab a second table gives the time to the first token alone (max_tokens 1: the
prompt's prefill and one step) for ours-int4 and ours-int4-old-prefill.
Every request has the same chat-templated prompt and generates exactly --max-tokens tokens
(greedy, EOS ignored / min_new_tokens), so tokens/s = generated tokens / wall time including the
prompt's prefill. On a shared machine the figures are noisy: the table gives median and min-max.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from common import fmt, interleave, spread, write_json
import lmforge.model.quantized as quantized
from lmforge.gguf_file import bundled_smollm2
from lmforge.model import load, save_hf
from lmforge.quant import quantize_model
from lmforge.serve import EngineConfig, LLMEngine, SamplingParams
from lmforge.tokenizer import load_tokenizer


def ours(model, tok, prompts, max_tokens):
    engine = LLMEngine(model, tok, EngineConfig(kv_cache_mb=64, max_num_seqs=64))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return engine.generate(prompts, params)


def hf_side(hf, prompts, max_tokens, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                           do_sample=False, pad_token_id=pad_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefill-ab", action="store_true", help="also int4 with the old dequantising prompt path")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    path = bundled_smollm2()
    tok, base = load_tokenizer(path), load(path)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(base, tmp, tokenizer=tok, overwrite=True)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    models = {"ours-fp32": base,
              "ours-int8": quantize_model(copy.deepcopy(base), "int8"),
              "ours-int4": quantize_model(copy.deepcopy(base), "rtn", group_size=128, asym=True)}
    prompt = tok.encode_chat([{"role": "user", "content": "Write a short story about a robot who learns to paint."}])
    summary, raw = {}, {}

    def old_prefill(run):
        def side():
            saved, quantized.INT4_KERNEL_MAX_ROWS = quantized.INT4_KERNEL_MAX_ROWS, quantized.KERNEL_MAX_ROWS
            try:
                return run()
            finally:
                quantized.INT4_KERNEL_MAX_ROWS = saved
        return side
    int4 = models["ours-int4"]
    if args.prefill_ab:
        first = {"ours-int4": lambda: ours(int4, tok, [prompt], 1),
                 "ours-int4-old-prefill": old_prefill(lambda: ours(int4, tok, [prompt], 1))}
        for side in first.values():
            side()
        times, _ = interleave(first, args.repeat)
        raw["first_token_s"], summary["first_token_s"] = times, {k: spread(v) for k, v in times.items()}
        print(f"\ntime to first token (prefill of {len(prompt)} prompt tokens + 1 step), median (min-max)")
        for name, st in summary["first_token_s"].items():
            print(f"  {name:22s} {fmt(st, 1e3, 1, ' ms')}")
    for n in [int(c) for c in args.concurrency.split(",")]:
        prompts = [prompt] * n
        sides = {"hf-fp32": lambda: hf_side(hf, prompts, args.max_tokens, tok.eos_id)}
        sides |= {name: (lambda m=m: ours(m, tok, prompts, args.max_tokens)) for name, m in models.items()}
        if args.prefill_ab:
            sides["ours-int4-old-prefill"] = old_prefill(lambda: ours(int4, tok, prompts, args.max_tokens))
        for side in sides.values():   # warm-up (allocations, kernel layouts)
            side()
        times, _ = interleave(sides, args.repeat)
        tps = {name: [n * args.max_tokens / t for t in ts] for name, ts in times.items()}
        raw[n] = tps
        summary[n] = {name: spread(v) for name, v in tps.items()}
        print(f"\n{n} stream(s), {args.max_tokens} tokens each, {args.threads} thread(s), median (min-max) tokens/s")
        for name, s in summary[n].items():
            print(f"  {name:10s} {fmt(s, digits=1)}  x{s['median'] / summary[n]['hf-fp32']['median']:.2f} vs hf-fp32")
    write_json(args.json, "quant", vars(args), raw, summary)


if __name__ == "__main__":
    main()
