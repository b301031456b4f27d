"""Decode against the memory roofline: how close a decode step comes to reading the bytes it needs at
the machine's memory bandwidth, ours and transformers' in the same interleaved rounds.

    python benchmarks/decode_roofline.py --threads 1                          # CPU: fp32 and int4, 1 stream
    python benchmarks/decode_roofline.py --device cuda --dtype bfloat16 --compile --batch 1,64

Sides, each decoding --batch greedy streams of --max-tokens tokens after the same chat prompt(s):
  lmforge        the engine on the float weights (--dtype), warmed up (`LLMEngine.warm_up`)
  lmforge-int4   the same weights as RTN int4 g32 with a 4-bit LM head (`lmforge quantize --method rtn
                 --group-size 32 --head-bits 4`), through the engine's int4 path
  hf             transformers `generate` on the float weights (a padded static batch)
Each decode step's wall time is taken (prefill steps excluded; HF's from a stopping-criteria clock);
the table gives the median step over --repeat rounds (min-max over rounds' medians).

Bytes a step needs: every weight tensor it reads, measured on the warmed-up model (an int4 layer in
the layout its CPU kernel reads; the LM head; not an untied embedding table, of which a step reads
one row per stream), plus each stream's K/V at its mean length over the run, at the KV cache's
element size.
Achieved bandwidth = bytes / median step time, as a fraction of
  sheet  the data sheet's memory bandwidth (a GPU in lmforge.plan's table, or --peak-gbps), and
  copy   a measured device copy of a buffer far larger than the caches (read + write counted, as
         STREAM does): the bandwidth this process can practically get.
With many streams the step turns compute-bound (lmforge.plan's `decode_bound` says where; the
bandwidth fraction is then of a roofline the step cannot reach): GFLOP/s counts 2 FLOPs per weight per
stream plus attention's 4 * layers * context * heads * head_dim, the same work for every side.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from common import spread, write_json
from serve import QUESTIONS, hf_generate, load_hf


def weight_bytes(model) -> int:
    """Bytes of the tensors a decode step reads: every parameter and buffer once (a tied LM head is
    the embedding table), except an untied embedding table. An int4 layer whose CPU kernel layout the
    warm-up built counts that layout instead of its stored codes, scales and zeros: it is what the
    kernel reads (siblings fused into one kernel call share one layout, held by the first)."""
    from lmforge.model.quantized import Int4Linear
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    fused = {id(m): m._fused for m in int4 if m._fused is not None}
    covered = {layer_id for entry in fused.values() for layer_id, _ in entry[0]}
    reads = {}
    for module in model.modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if id(module) in covered:
            tensors = list(fused[id(module)][1][1:]) if id(module) in fused else []
        elif isinstance(module, Int4Linear) and module._kernel_cache is not None:
            tensors = list(module._kernel_cache[1:])
        for t in tensors:
            if isinstance(t, torch.Tensor):
                reads[id(t)] = t.numel() * t.element_size()
    head = getattr(model.lm_head, "weight", None)
    if head is None or head is not model.embed_tokens.weight:
        reads.pop(id(model.embed_tokens.weight), None)
    return sum(reads.values())


def copy_bandwidth(device: torch.device, gib: float, repeat: int = 5) -> float:
    """Bytes/s of dst.copy_(src), read + write counted, best of `repeat`."""
    n = int(gib * 2**30) // 4
    src, dst = torch.ones(n, device=device), torch.empty(n, device=device)
    best = float("inf")
    for _ in range(repeat + 1):   # the first touches the pages
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sheet_bandwidth(device: torch.device, peak_gbps: float | None) -> tuple[str, float | None]:
    """(where the figure comes from, bytes/s): --peak-gbps, else the planner's entry for this GPU."""
    if peak_gbps:
        return "--peak-gbps", peak_gbps * 1e9
    if device.type != "cuda":
        return "none for a CPU: give --peak-gbps", None
    from lmforge.plan.gpus import GPUS
    name = torch.cuda.get_device_name(device).lower()
    matches = [g for key, g in GPUS.items() if key.split("-")[0] in name]
    if len(matches) != 1:   # none, or several (A100 40 / 80 GB): the user says which
        return f"{name} is not one GPU of lmforge.plan's table: give --peak-gbps", None
    return f"the {matches[0].name} data sheet", matches[0].bandwidth


def engine_steps(engine, prompts: list[list[int]], max_tokens: int) -> list[float]:
    """Seconds of each decode step of all the streams (every prompt in the cache, none finished)."""
    from lmforge.serve import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [engine.add_request(None, p, params) for p in prompts]
    times = []
    while engine.has_work:
        seqs = [engine.seqs.get(i) for i in ids]
        decoding = all(seq is not None and seq.num_computed >= seq.num_prompt_tokens for seq in seqs)
        start = time.perf_counter()
        engine.step()
        if decoding:
            times.append(time.perf_counter() - start)
    return times


def main():
    from lmforge.gguf_file import bundled_smollm2
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or checkpoint (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", default="1", help="comma-separated stream counts")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--sides", default="lmforge,lmforge-int4,hf")
    ap.add_argument("--compile", action="store_true", help="compiled decode (EngineConfig(compile_decode=True))")
    ap.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: default)")
    ap.add_argument("--peak-gbps", type=float, default=None, help="data-sheet bandwidth (default: the GPU's, from lmforge.plan)")
    ap.add_argument("--copy-gib", type=float, default=None, help="buffer for the copy test (default: 4 on GPU, 1 on CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sides = [s for s in args.sides.split(",") if s]
    unknown = set(sides) - {"lmforge", "lmforge-int4", "hf"}
    if unknown:
        raise SystemExit(f"unknown --sides {sorted(unknown)}")
    batches = [int(b) for b in args.batch.split(",")]
    if min(batches) < 1:
        raise SystemExit(f"--batch takes stream counts of at least 1, got {args.batch}")

    from lmforge.model import load, save
    from lmforge.quant import quantize_model
    from lmforge.serve import EngineConfig, LLMEngine
    from lmforge.serve.paged_cache import PagedKVCache
    from lmforge.tokenizer import load_tokenizer
    model_path = Path(args.model or bundled_smollm2())
    tok = load_tokenizer(model_path)
    all_prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    config = EngineConfig(kv_cache_mb=1024, max_num_seqs=max(batches), prefix_caching=False,
                          compile_decode=args.compile)
    float_model = load(model_path, dtype, device)
    cfg = float_model.cfg
    kv_per_token = PagedKVCache.bytes_per_block(cfg, 1, dtype)
    float_bytes = weight_bytes(float_model)
    bytes_of = {"lmforge": float_bytes, "hf": float_bytes}   # the same weights
    n_weights = float_bytes / float_model.embed_tokens.weight.element_size()   # 2 FLOPs each per stream
    engines = {}
    for side in sides:
        if side == "lmforge":
            model = float_model
        elif side == "lmforge-int4":
            with tempfile.TemporaryDirectory(prefix="roofline-") as tmp:   # load() gives the serving layout
                save(quantize_model(load(model_path, dtype), "rtn", bits=4, group_size=32, head_bits=4), tmp,
                     tokenizer=tok)
                model = load(tmp, dtype, device)
        else:
            continue
        engines[side] = LLMEngine(model.eval(), tok, config)
        warm = engines[side].warm_up()
        bytes_of[side] = weight_bytes(model)   # after the warm-up: with the kernels' own layouts
        print(f"{side}: warmed up in {warm:.1f} s; {bytes_of[side] / 1e6:,.1f} MB of weights per step", flush=True)
    hf = None
    if "hf" in sides:
        hf = load_hf(model_path, dtype, device)
        hf_generate(hf, all_prompts[:2], 4, tok.eos_id or 0, device)

    copy_bw = copy_bandwidth(device, args.copy_gib or (4.0 if device.type == "cuda" else 1.0))
    source, sheet = sheet_bandwidth(device, args.peak_gbps)
    print(f"{device}/{args.dtype}, torch threads {torch.get_num_threads()}, measured copy "
          f"{copy_bw / 1e9:,.1f} GB/s, data sheet " + (f"{sheet / 1e9:,.0f} GB/s ({source})" if sheet else source),
          flush=True)

    raw, summary = {}, {}
    for b in batches:
        prompts = [all_prompts[i % len(all_prompts)] for i in range(b)]
        mean_context = statistics.mean(len(p) for p in prompts) + args.max_tokens / 2
        rounds = {s: [] for s in sides}
        for r in range(args.repeat):
            k = r % len(sides)
            for side in sides[k:] + sides[:k]:
                if side == "hf":
                    stamps = hf_generate(hf, prompts, args.max_tokens, tok.eos_id or 0, device)
                    steps = [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])]
                else:
                    steps = engine_steps(engines[side], prompts, args.max_tokens)
                rounds[side].append(statistics.median(steps))
        print(f"\n== {b} stream(s), mean context {mean_context:.0f} tokens: median decode step over "
              f"{args.repeat} rounds ==")
        flops = b * (2 * n_weights + 4 * cfg.n_layers * mean_context * cfg.n_heads * cfg.head_dim)
        print(f"{'side':<14}{'ms/step':>24}{'tok/s':>10}{'MB/step':>10}{'GB/s':>9}{'copy':>8}{'sheet':>8}"
              f"{'GFLOP/s':>10}")
        for side in sides:
            s = spread(rounds[side])
            need = bytes_of[side] + b * mean_context * kv_per_token
            gbps = need / s["median"]
            row = {"step_s": s, "bytes": need, "bandwidth": gbps, "of_copy": gbps / copy_bw,
                   "of_sheet": gbps / sheet if sheet else None, "flops": flops}
            summary[f"{side} x{b}"], raw[f"{side} x{b}"] = row, rounds[side]
            print(f"{side:<14}{s['median'] * 1e3:>10.2f} ({s['min'] * 1e3:.2f}-{s['max'] * 1e3:.2f})"
                  f"{b / s['median']:>10.1f}{need / 1e6:>10.1f}{gbps / 1e9:>9.1f}{gbps / copy_bw:>8.0%}"
                  f"{(f'{gbps / sheet:.0%}' if sheet else '-'):>8}{flops / s['median'] / 1e9:>10.1f}")
    write_json(args.json, "decode_roofline", {**vars(args), "copy_bandwidth": copy_bw, "sheet_bandwidth": sheet},
               raw, summary)


if __name__ == "__main__":
    main()
