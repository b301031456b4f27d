"""Decode-row attention on CPU, one layer of SmolLM2-135M's shapes (9 query heads, 3 KV heads, head_dim
64) over a float32 paged cache: lmforge's row kernel (serve/row_attention.cpp: each row over exactly
its own keys, read in place, same bits however the step is batched) against the path it replaced and
still used off CPU (gather the rows' keys, SDPA over the padded batch with a mask).

    python benchmarks/row_attention.py                       # one thread
    python benchmarks/row_attention.py --threads 2 --cases 1x100,16x200
    python benchmarks/row_attention.py --model INT4 --compile   # whole decode, SmolLM2 by default

Each case is ROWSxKEYS: ROWS sequences of KEYS keys each, in scattered 16-slot blocks. Microseconds
per layer call, median of --repeat timed batches, and the kernel's speed-up.

With --model (a checkpoint or GGUF; `--model bundled` for the bundled SmolLM2) it times whole decoding
instead: --streams chat prompts decoded together for --max-tokens greedy tokens by two engines on the
same model, one attending through the kernel and one through gather + SDPA, interleaved rounds; tokens/s
and the per-round speed-up (the prompts' prefill included, as a user sees it).
"""
from __future__ import annotations

import argparse
import time

import torch

from common import fmt, interleave, inverse, ratios, spread
from cpu_matmul_kernels import timed
from lmforge.model import ModelConfig
from lmforge.serve.paged_cache import PagedKVCache

QUESTIONS = ["Write a short story about a robot who learns to paint.", "Explain how a rainbow forms.",
             "What are the benefits of reading books?", "Describe a day in the life of a farmer."]


def decode(args) -> None:
    from lmforge.gguf_file import bundled_smollm2
    from lmforge.model import load_pretrained
    from lmforge.serve import EngineConfig, LLMEngine, SamplingParams
    path = str(bundled_smollm2()) if args.model == "bundled" else args.model
    loaded = load_pretrained(path, None, "float32", "cpu")
    model, tok = loaded.model, loaded.tokenizer
    engines = {name: LLMEngine(model, tok, EngineConfig(kv_cache_mb=64, compile_decode=args.compile))
               for name in ("kernel", "sdpa")}
    engines["sdpa"].cache.row_kernel = False
    prompts = [tok.encode_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + " " * (i // 4)}])
               for i in range(args.streams)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    for engine in engines.values():   # warm-up (and compile: one row, several rows)
        for n in (1, 2):
            engine.generate(prompts[:n], SamplingParams(max_tokens=8, temperature=0))
    side = lambda e: lambda: engines[e].generate(prompts, params)  # noqa: E731
    start = time.perf_counter()
    times, results = interleave({e: side(e) for e in engines}, args.repeat)
    tokens = sum(len(r["token_ids"]) for r in results["kernel"])
    same = [a["token_ids"] for a in results["kernel"]] == [b["token_ids"] for b in results["sdpa"]]
    print(f"{path}: {args.streams} stream(s) x {args.max_tokens} tokens, {torch.get_num_threads()} thread(s), "
          f"{'compiled' if args.compile else 'eager'}, {args.repeat} rounds in {time.perf_counter() - start:.0f} s")
    print(f"  kernel {fmt(inverse(spread(times['kernel']), tokens), digits=1)} tok/s | gather+SDPA "
          f"{fmt(inverse(spread(times['sdpa']), tokens), digits=1)} tok/s | kernel speed-up "
          f"{fmt(ratios(times['sdpa'], times['kernel']))}x | same tokens: {same}")


def cases(text: str) -> list[tuple[int, int]]:
    """'1x100,16x200' -> [(1, 100), (16, 200)] (argparse turns the ValueError into a usage error)."""
    out = [tuple(int(n) for n in case.split("x")) for case in text.split(",")]
    if not all(len(c) == 2 and min(c) >= 1 for c in out):
        raise ValueError(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=cases, default="1x100,1x400,1x1500,4x300,16x200,16x800")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--model", default=None, help="time whole decoding of this model instead ('bundled': SmolLM2)")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="decode through torch.compile (with --model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        return decode(args)
    cfg = ModelConfig(vocab_size=32, dim=576, n_layers=1, n_heads=9, n_kv_heads=3, hidden_dim=64)
    bs, g = 16, torch.Generator().manual_seed(0)
    print(f"one layer, 9/3 heads x 64, float32 cache, {args.threads} thread(s); microseconds per call")
    print(f"{'rows x keys':>12} {'kernel':>9} {'gather+SDPA':>12} {'speed-up':>9}")
    for rows, n in args.cases:
        case = f"{rows}x{n}"
        blocks_per_row = -(-n // bs)
        cache = PagedKVCache(cfg, num_blocks=rows * blocks_per_row * 2, block_size=bs)
        assert cache.row_kernel, "lmforge's CPU kernels did not build"
        k, v = torch.randn(2, cache.num_blocks * bs, 3, 64, generator=g)
        cache.write(0, torch.arange(cache.num_blocks * bs), k, v)
        tables = torch.randperm(cache.num_blocks, generator=g)[:rows * blocks_per_row].view(rows, -1)
        keys = (tables[:, :, None] * bs + torch.arange(bs)).reshape(rows, -1)[:, :n].reshape(-1)
        lengths = torch.full((rows,), n)
        q = torch.randn(rows, 9, 64, generator=g)
        times = {}
        for kernel in (True, False):
            cache.row_kernel = kernel
            times[kernel] = timed(lambda: cache.row_attention(0, q, keys, lengths), args.repeat)
        print(f"{case:>12} {times[True]:9.1f} {times[False]:12.1f} {times[False] / times[True]:8.2f}x")


if __name__ == "__main__":
    main()
