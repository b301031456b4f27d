"""Serving benchmark: N concurrent streaming clients against `lmforge serve` vs the same prompts
through transformers `generate` (same GGUF model, same precision), in the same run.

    python benchmarks/serve.py                         # SmolLM2-135M-Instruct GGUF, 1 and 16 streams
    python benchmarks/serve.py --concurrency 1,16,64 --max-tokens 64
    python benchmarks/serve.py --device cuda --dtype bfloat16 --compile   # GPU

Every request gets the same chat-templated prompt token ids on both sides and generates exactly
--max-tokens tokens (greedy; EOS ignored on ours, suppressed with min_new_tokens on HF), so token
counts match. Reported per side: aggregate tokens/s, TTFT p50/p99, inter-token latency (ITL) mean
and p99; then the ratios. transformers has no server: it is measured two ways,
  hf-seq    requests served one after another with generate() (a naive generate()-based server),
  hf-batch  all N prompts left-padded into one static generate() batch (its best case offline).
llama.cpp (llama-cpp-python, if importable) runs its native Q4_1 kernels, one request at a time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

QUESTIONS = [
    "Write a short story about a robot who learns to paint.", "List five tips for staying healthy.",
    "Explain how a rainbow forms.", "Describe the city of Paris.", "What are the benefits of reading books?",
    "Explain photosynthesis to a child.", "Write a poem about the ocean.", "How do airplanes stay in the air?",
    "Give me a recipe for pancakes.", "What is machine learning?", "Describe a day in the life of a farmer.",
    "Why do we have seasons?", "Write a letter to a friend about a trip.", "How does the internet work?",
    "What makes a good leader?", "Explain how vaccines work.",
]


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summary(name, results, wall):
    """results: per request {"ttft": s, "gaps": [s...], "tokens": n}."""
    tokens = sum(r["tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    return {"name": name, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": pct([r["ttft"] for r in results], 50),
            "ttft_p99": pct([r["ttft"] for r in results], 99),
            "itl_mean": statistics.fmean(gaps) if gaps else float("nan"), "itl_p99": pct(gaps, 99)}


# --- ours: a real server process, streaming clients ------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from lmforge.cli import main; main()", "serve", str(args.model),
           "--port", str(port), "--name", "bench", "--device", args.device, "--dtype", args.dtype,
           "--max-num-seqs", "64", "--max-queue", "1024", "--kv-cache-mb", str(args.kv_cache_mb),
           "--max-batched-tokens", str(args.max_batched_tokens)]
    if args.compile:
        cmd.append("--compile")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += extra
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


async def stream_request(http: httpx.AsyncClient, prompt_ids: list[int], max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start, "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens}


async def run_ours(url: str, prompts: list[list[int]], max_tokens: int) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await stream_request(http, prompts[0], 4)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_request(http, p, max_tokens) for p in prompts))
        return list(results), time.perf_counter() - start


# --- transformers -------------------------------------------------------------------------------------
class TokenClock:
    """A StoppingCriteria that never stops, only timestamps each generation step."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_generate(hf, batch: list[list[int]], max_tokens: int, pad_id: int, device) -> list[float]:
    from transformers import StoppingCriteriaList
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    clock = TokenClock()
    with torch.no_grad():
        hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                    pad_token_id=pad_id, stopping_criteria=StoppingCriteriaList([clock]))
    return clock.stamps


def run_hf_sequential(hf, prompts, max_tokens, pad_id, device):
    results, start = [], time.perf_counter()
    for p in prompts:
        stamps = hf_generate(hf, [p], max_tokens, pad_id, device)
        results.append({"ttft": stamps[0] - start, "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
                        "tokens": len(stamps)})
    return results, time.perf_counter() - start


def run_hf_batch(hf, prompts, max_tokens, pad_id, device):
    start = time.perf_counter()
    stamps = hf_generate(hf, prompts, max_tokens, pad_id, device)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return [{"ttft": stamps[0] - start, "gaps": gaps, "tokens": len(stamps)} for _ in prompts], time.perf_counter() - start


# --- llama.cpp (optional) -----------------------------------------------------------------------------
def run_llama_cpp(model_path, prompts, max_tokens, threads):
    from llama_cpp import Llama
    llm = Llama(model_path=str(model_path), n_ctx=2048, n_threads=threads, verbose=False)
    for i, _ in enumerate(llm.generate(prompts[0], top_k=1, temp=0.0, reset=True)):  # warm-up
        if i == 3:
            break
    results, start = [], time.perf_counter()
    for p in prompts:
        stamps = []
        for _ in llm.generate(p, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == max_tokens:
                break
        results.append({"ttft": stamps[0] - start, "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
                        "tokens": len(stamps)})
    return results, time.perf_counter() - start


def ratios(report, mine: str, n: int) -> None:
    ours = report[(mine, n)]
    for side in ("hf-seq", "hf-batch", "llama.cpp"):
        ref = report.get((side, n))
        if ref:
            print(f"{mine}/{side}: throughput x{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}, "
                  f"TTFT p50 x{ref['ttft_p50'] / ours['ttft_p50']:.2f} lower, "
                  f"ITL mean x{ref['itl_mean'] / ours['itl_mean']:.2f} lower")


def show(rows):
    print(f"{'':<22}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL mean':>10}{'ITL p99':>10}{'tokens':>8}")
    for r in rows:
        print(f"{r['name']:<22}{r['tokens_per_s']:>9.1f}{r['ttft_p50']:>9.3f}s{r['ttft_p99']:>9.3f}s"
              f"{r['itl_mean'] * 1000:>8.1f}ms{r['itl_p99'] * 1000:>8.1f}ms{r['tokens']:>8}")


def main():
    from lmforge.gguf_file import bundled_smollm2
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--kv-cache-mb", type=int, default=512)
    ap.add_argument("--max-batched-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads on both sides (0: default)")
    ap.add_argument("--int8", action="store_true", help="also measure lmforge with INT8 weights (not the same precision)")
    ap.add_argument("--skip-hf-batch", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    args.model = Path(args.model or bundled_smollm2())
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]

    from lmforge.tokenizer import load_tokenizer
    tok = load_tokenizer(args.model)
    all_prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    prompts_for = {n: [all_prompts[i % len(all_prompts)] for i in range(n)] for n in levels}
    print(f"model {args.model.name}, {args.device}/{args.dtype}, {args.max_tokens} new tokens per request, "
          f"torch threads {torch.get_num_threads()}")

    report = {}
    variants = [("ours", "lmforge", [])] + ([("ours-int8", "lmforge --int8", ["--int8"])] if args.int8 else [])
    for key, label, extra in variants:
        port = free_port()
        server = start_server(args, port, extra)
        try:
            for n in levels:
                results, wall = asyncio.run(run_ours(f"http://127.0.0.1:{port}", prompts_for[n], args.max_tokens))
                report[(key, n)] = summary(f"{label} x{n}", results, wall)
        finally:
            server.terminate()
            server.wait(30)

    import transformers
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(args.model.parent), gguf_file=args.model.name,
                                                           dtype=dtype).to(device).eval()
    pad = tok.eos_id or 0
    hf_generate(hf, [all_prompts[0]], 4, pad, device)  # warm-up
    for n in levels:
        results, wall = run_hf_sequential(hf, prompts_for[n], args.max_tokens, pad, device)
        report[("hf-seq", n)] = summary(f"hf-seq x{n}", results, wall)
        if n > 1 and not args.skip_hf_batch:
            results, wall = run_hf_batch(hf, prompts_for[n], args.max_tokens, pad, device)
            report[("hf-batch", n)] = summary(f"hf-batch x{n}", results, wall)
    del hf

    try:
        import llama_cpp  # noqa: F401
        for n in levels:
            results, wall = run_llama_cpp(args.model, prompts_for[n], args.max_tokens, torch.get_num_threads())
            report[("llama.cpp", n)] = summary(f"llama.cpp(Q4_1) x{n}", results, wall)
    except ImportError:
        print("llama-cpp-python not importable: llama.cpp column skipped")

    for n in levels:
        print(f"\n== {n} concurrent stream(s) ==")
        show([v for (side, k), v in report.items() if k == n])
        for mine in ("ours", "ours-int8"):
            if (mine, n) in report:
                ratios(report, mine, n)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{s}@{n}": v for (s, n), v in report.items()}, indent=2))


if __name__ == "__main__":
    main()
