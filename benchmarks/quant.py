"""Decode speed of quantised weights on CPU: tokens/s at 1 and 16 concurrent streams.

    python benchmarks/quant.py                        # SmolLM2-135M-Instruct, 32 tokens, 3 rounds
    python benchmarks/quant.py --max-tokens 64 --repeat 5 --threads 2 --json quant.json

Sides, all in this one process, interleaved round by round (benchmarks/common.interleave):
  hf-fp32      transformers float32: one generate() for 1 stream, a left-padded static batch of 16
  ours-fp32    lmforge's serving engine (LLMEngine), float32 weights
  ours-int8    per-channel int8 weights (_weight_int8pack_mm while decoding)
  ours-int4    RTN int4 g128 asymmetric body + int8 LM head (_weight_int4pack_mm_for_cpu);
               AWQ/GPTQ checkpoints store the same layers, so they decode at the same speed
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
    for n in [int(c) for c in args.concurrency.split(",")]:
        prompts = [prompt] * n
        sides = {"hf-fp32": lambda: hf_side(hf, prompts, args.max_tokens, tok.eos_id)}
        sides |= {name: (lambda m=m: ours(m, tok, prompts, args.max_tokens)) for name, m in models.items()}
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
