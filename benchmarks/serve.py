"""Serving benchmark: N streaming clients against `lmforge serve` vs transformers `generate` and
llama.cpp on the same model, interleaved and repeated in one run.

    python benchmarks/serve.py                         # SmolLM2-135M-Instruct GGUF, 1 and 16 streams
    python benchmarks/serve.py --variants int8,int4 --llama-cpp-python /work/llamacpp-venv/bin/python
    python benchmarks/serve.py --concurrency 1,16 --repeat 5 --variants int8,int4,kv-int8,prefix-cache
    python benchmarks/serve.py --device cuda --dtype bfloat16 --compile   # GPU

Every request gets the same chat-templated prompt token ids on every side and generates exactly
--max-tokens tokens (greedy; EOS ignored on ours and llama.cpp, suppressed with min_new_tokens on
HF), so token counts match. Sides:
  lmforge   a real `lmforge serve` process (float, prefix caching off: rounds repeat the same prompts,
            which a prefix cache would serve from memory); the N requests are sent at once as
            streaming clients
  lmforge-V one more server per --variants entry, each one feature switched on, reported as its
            speed-up over `lmforge` (the feature off):
              int8          per-channel INT8 weights (--int8)
              int4          RTN int4 g32 symmetric, LM head included (`lmforge quantize --method rtn
                            --group-size 32 --head-bits 4`: the grid and precision of llama.cpp's Q4_0,
                            whose tied output matrix is 4-bit too), through lmforge's int4 x int8 kernel
              int4-pt       the same checkpoint through PyTorch's int4 kernel (LMFORGE_INT4_KERNEL=torch),
                            also compared with lmforge-int4: the kernel's own speed-up
              kv-int8       int8 KV cache (--kv-dtype int8)
              prefix-cache  prefix caching on (later rounds hit the cache: the repeated-prompt case)
              ngram         prompt-lookup speculative decoding (--speculative ngram)
              w8a8          SmoothQuant int8 weights and int8 activations, every linear (`lmforge quantize
                            --method smoothquant`: integer dot products, as llama.cpp's Q8_0 x Q8 activations)
              gguf-int4     the --model GGUF's own Q4_0/Q4_1 matrices served as int4 layers, the rest
                            (the LM head) int8 (--gguf-int4 --int8)
              no-prepack    the one feature that is on by default, switched off: float32 linears through
                            F.linear instead of oneDNN on prepacked weights (--no-prepack)
  hf-batch  the strongest transformers peer at equal precision: the N prompts left-padded into one
            static `generate()` batch (the best case of an offline batch, no server around it)
  hf-seq    secondary: one `generate()` per request, one after another (a naive generate()-based
            server); run on --seq-requests of the N prompts, as its throughput does not depend on N
  llama.cpp-q4_0 / llama.cpp-q8_0 (with --llama-cpp-python PYTHON, at 1 stream only: llama-cpp-python
            decodes one sequence) llama.cpp on our own Q4_0 / Q8_0 GGUF export of the same float
            weights, in a separate process run by that venv's python (benchmarks/llama_cpp_peer.py);
            compared with lmforge-int4 / lmforge-int8; llama.cpp-gguf: llama.cpp on the --model file itself,
            compared with lmforge-gguf-int4 (the same bytes). Without the option the peer is skipped.
Every round runs each side once at each concurrency, the order rotating from round to round; the
table gives the median over --repeat rounds and min-max. Per round: aggregate tokens/s (generated
tokens / wall time, prefill included), decode tokens/s (1 / mean inter-token gap of one stream),
TTFT p50, inter-token latency (ITL) mean. TTFT has no queueing artefact: on lmforge and hf-batch all
N requests are submitted at the same instant t0 and TTFT is t0 -> that request's first token (HF's
first token is shared by the batch); on hf-seq TTFT is measured from the start of that request's own
generate(), not from t0, so time spent waiting behind earlier requests is excluded (its service time).
At concurrency 1 every TTFT is the single-request TTFT.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion bar

import httpx
import torch

from common import fmt, interleave, ratios, spread, write_json

QUESTIONS = [
    "Write a short story about a robot who learns to paint.", "List five tips for staying healthy.",
    "Explain how a rainbow forms.", "Describe the city of Paris.", "What are the benefits of reading books?",
    "Explain photosynthesis to a child.", "Write a poem about the ocean.", "How do airplanes stay in the air?",
    "Give me a recipe for pancakes.", "What is machine learning?", "Describe a day in the life of a farmer.",
    "Why do we have seasons?", "Write a letter to a friend about a trip.", "How does the internet work?",
    "What makes a good leader?", "Explain how vaccines work.",
]


def round_metrics(results: list[dict], wall: float) -> dict:
    """results: per request {"ttft": s, "gaps": [s...], "tokens": n} -> this round's figures."""
    tokens = sum(r["tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50": statistics.median(r["ttft"] for r in results),
            "itl_mean": statistics.fmean(gaps) if gaps else float("nan"),
            "decode_tok_s": 1 / statistics.fmean(gaps) if gaps else float("nan")}


# --- ours: a real server process, streaming clients ------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model: Path, port: int, extra: list[str], env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from lmforge.cli import main; main()", "serve", str(model),
           "--port", str(port), "--name", "bench", "--device", args.device, "--dtype", args.dtype,
           "--max-num-seqs", "64", "--max-queue", "1024", "--kv-cache-mb", str(args.kv_cache_mb),
           "--max-batched-tokens", str(args.max_batched_tokens)]
    if args.compile:
        cmd.append("--compile")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += extra
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env={**os.environ, **env})
    start = time.monotonic()
    while time.monotonic() < start + 600:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"server exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                print(f"server {' '.join(extra + [f'{k}={v}' for k, v in env.items()]) or '(fp)'} up in {time.monotonic() - start:.0f} s", flush=True)
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


async def stream_request(http: httpx.AsyncClient, prompt_ids: list[int], max_tokens: int, t0: float) -> dict:
    body = {"model": "bench", "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
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
    return {"ttft": stamps[0] - t0, "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens}


async def _ours(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        # open the connections first so that t0 -> first token is not connection setup
        await asyncio.gather(*(http.get("/health") for _ in prompts))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_request(http, p, max_tokens, t0) for p in prompts))
        return round_metrics(list(results), time.perf_counter() - t0)


def run_ours(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    return asyncio.run(_ours(url, prompts, max_tokens))


# --- llama.cpp: another venv's python, another process ----------------------------------------------------
class LlamaCppPeer:
    """benchmarks/llama_cpp_peer.py serving one GGUF file over a pipe, one request at a time."""

    def __init__(self, python: str, gguf: Path, threads: int):
        script = Path(__file__).with_name("llama_cpp_peer.py")
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([python, str(script), str(gguf), str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        hello = self._read()
        print(f"llama.cpp peer up on {gguf.name} (llama-cpp-python {hello.get('version')})", flush=True)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise SystemExit(f"llama.cpp peer exited: {self.log.read()[-2000:]}")
        return json.loads(line)

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        results, t0 = [], time.perf_counter()
        for p in prompts:
            self.proc.stdin.write(json.dumps({"prompt": p, "max_tokens": max_tokens}) + "\n")
            results.append(self._read())
        return round_metrics(results, time.perf_counter() - t0)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- transformers -------------------------------------------------------------------------------------
class TokenClock:
    """A StoppingCriteria that never stops, only timestamps each generation step."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.is_cuda:   # the step's kernels done, not only queued
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def load_hf(model: Path, dtype: torch.dtype, device: torch.device):
    """The transformers peer on the same weights: from the GGUF itself (dequantised) or a checkpoint folder."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    files = dict(pretrained_model_name_or_path=str(model.parent), gguf_file=model.name) if model.suffix == ".gguf" \
        else dict(pretrained_model_name_or_path=str(model))
    return transformers.AutoModelForCausalLM.from_pretrained(**files, dtype=dtype).to(device).eval()


def hf_generate(hf, batch: list[list[int]], max_tokens: int, pad_id: int, device) -> list[float]:
    from transformers import StoppingCriteriaList
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    clock = TokenClock()
    with torch.no_grad():
        hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                    pad_token_id=pad_id, stopping_criteria=StoppingCriteriaList([clock]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock.stamps


def run_hf_batch(hf, prompts, max_tokens, pad_id, device) -> dict:
    t0 = time.perf_counter()
    stamps = hf_generate(hf, prompts, max_tokens, pad_id, device)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    results = [{"ttft": stamps[0] - t0, "gaps": gaps, "tokens": len(stamps)} for _ in prompts]
    return round_metrics(results, time.perf_counter() - t0)


def run_hf_sequential(hf, prompts, max_tokens, pad_id, device) -> dict:
    results, t0 = [], time.perf_counter()
    for p in prompts:
        start = time.perf_counter()  # service TTFT: from this request's own start, no queueing
        stamps = hf_generate(hf, [p], max_tokens, pad_id, device)
        results.append({"ttft": stamps[0] - start, "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
                        "tokens": len(stamps)})
    return round_metrics(results, time.perf_counter() - t0)


METRICS = (("tokens_per_s", "tok/s", 1, 1, ""), ("decode_tok_s", "decode tok/s/stream", 1, 1, ""),
           ("ttft_p50", "TTFT p50", 1, 3, "s"), ("itl_mean", "ITL mean", 1000, 1, "ms"))
# --variants: name -> the `lmforge serve` options that switch the feature on (int4: its own checkpoint)
VARIANTS = {"int8": ["--int8"], "int4": [], "kv-int8": ["--kv-dtype", "int8"], "prefix-cache": ["--prefix-caching"],
            "ngram": ["--speculative", "ngram"], "gguf-int4": ["--gguf-int4", "--int8"], "w8a8": [],
            "no-prepack": ["--no-prepack"], "int4-pt": []}
VARIANT_ENV = {"int4-pt": {"LMFORGE_INT4_KERNEL": "torch"}}
# llama.cpp's file -> the lmforge variant with the same weights ("gguf": the --model file itself)
LLAMA_TYPES = {"q4_0": "int4", "q8_0": "int8", "gguf": "gguf-int4"}


def prepare_files(args, tmp: Path, variants: list[str]) -> dict[str, Path]:
    """Our int4 and w8a8 checkpoints and the Q4_0/Q8_0 GGUF exports, all from the same float weights."""
    from lmforge.model import load, save
    from lmforge.quant import quantize_model
    from lmforge.quant.calibration import calibration_batch
    from lmforge.tokenizer import load_tokenizer
    files = {}
    need_gguf = [k for k, v in LLAMA_TYPES.items() if v in variants] if args.llama_cpp_python else []
    if "gguf" in need_gguf:
        files["gguf"] = args.model
        need_gguf.remove("gguf")
    checkpoints = {"int4", "w8a8"} & {v.removesuffix("-pt") for v in variants}
    if not checkpoints and not need_gguf:
        return files
    tok = load_tokenizer(args.model)
    if need_gguf:
        from lmforge.quant.gguf_export import export_gguf
        base = load(args.model)
        for kind in need_gguf:
            files[kind] = export_gguf(base, tok, tmp / f"model-{kind}.gguf", kind, name="bench")
    settings = {"int4": lambda: {"method": "rtn", "bits": 4, "group_size": 32, "asym": False, "head_bits": 4},
                "w8a8": lambda: {"method": "smoothquant", "calibration": calibration_batch(tok)}}
    for name in sorted(checkpoints):
        save(quantize_model(load(args.model), **settings[name]()), tmp / name, tokenizer=tok)
        files[name] = tmp / name
    if "int4-pt" in variants:
        files["int4-pt"] = files["int4"]
    return files


def main():
    from lmforge.gguf_file import bundled_smollm2
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or checkpoint (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--seq-requests", type=int, default=4, help="requests hf-seq serves per round (0: skip it)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--kv-cache-mb", type=int, default=512)
    ap.add_argument("--max-batched-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads on every side (0: default)")
    ap.add_argument("--variants", default="", help=f"comma-separated lmforge features to measure against "
                    f"the plain server: {', '.join(VARIANTS)}")
    ap.add_argument("--llama-cpp-python", default=None, metavar="PYTHON",
                    help="python of a venv with llama-cpp-python: adds llama.cpp on our Q4_0/Q8_0 GGUF export "
                         "(for the int4/int8 variants) at 1 stream")
    ap.add_argument("--json", default=None, help="also write config, per-round figures and summary here")
    args = ap.parse_args()
    args.model = Path(args.model or bundled_smollm2())
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    if min(levels) < 1:
        raise SystemExit(f"--concurrency takes stream counts of at least 1, got {args.concurrency}")

    from lmforge.tokenizer import load_tokenizer
    tok = load_tokenizer(args.model)
    all_prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    prompts_for = {n: [all_prompts[i % len(all_prompts)] for i in range(n)] for n in levels}
    print(f"model {args.model.name}, {args.device}/{args.dtype}, {args.max_tokens} new tokens per request, "
          f"torch threads {torch.get_num_threads()}, {args.repeat} interleaved rounds")

    device = torch.device(args.device)
    hf = load_hf(args.model, getattr(torch, args.dtype), device)
    pad = tok.eos_id or 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; known: {', '.join(VARIANTS)}")
    if not args.llama_cpp_python:
        print("llama.cpp peer skipped (give --llama-cpp-python PYTHON of a venv with llama-cpp-python)")
    elif not set(LLAMA_TYPES.values()) & set(variants):
        print("llama.cpp peer skipped: it is compared with the int4/int8/gguf-int4 variants; add one of them")
    tmp = tempfile.TemporaryDirectory(prefix="serve-bench-")
    files = prepare_files(args, Path(tmp.name), variants)
    servers = {"lmforge": (args.model, ["--no-prefix-caching"], {})}
    for v in variants:
        prefix = [] if v == "prefix-cache" else ["--no-prefix-caching"]
        servers[f"lmforge-{v}"] = (files.get(v, args.model), VARIANTS[v] + prefix, VARIANT_ENV.get(v, {}))
    procs, urls, peers = {}, {}, {}
    try:
        for name, (model, extra, env) in servers.items():
            port = free_port()
            procs[name] = start_server(args, model, port, extra, env)
            urls[name] = f"http://127.0.0.1:{port}"
        for kind in LLAMA_TYPES:
            if kind in files:
                peers[f"llama.cpp-{kind}"] = LlamaCppPeer(args.llama_cpp_python, files[kind], torch.get_num_threads())
        sides = {}
        for n in levels:
            p = prompts_for[n]
            for name, url in urls.items():
                sides[(name, n)] = lambda url=url, p=p: run_ours(url, p, args.max_tokens)
            sides[("hf-batch", n)] = lambda p=p: run_hf_batch(hf, p, args.max_tokens, pad, device)
            if args.seq_requests and n > 1:  # at n = 1, hf-batch is one request alone already
                sides[("hf-seq", n)] = lambda p=p[:args.seq_requests]: run_hf_sequential(hf, p, args.max_tokens,
                                                                                          pad, device)
            if n == 1:
                for name, peer in peers.items():
                    sides[(name, n)] = lambda peer=peer, p=p: peer.run(p, args.max_tokens)
        for name, url in urls.items():  # warm-up, every side (with --compile: both graphs, 1 and 2+ streams)
            run_ours(url, all_prompts[:1], 4)
            run_ours(url, all_prompts[:2], 4)
        hf_generate(hf, all_prompts[:2], 4, pad, device)
        for peer in peers.values():
            peer.run(all_prompts[:2], 4)
        per_round = {k: [] for k in sides}

        def recorder(k):
            def run():
                per_round[k].append(sides[k]())
                print(f"  {k[0]} x{k[1]}: {per_round[k][-1]['tokens_per_s']:.1f} tok/s", flush=True)
            return run
        interleave({k: recorder(k) for k in sides}, args.repeat)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(30)
        for peer in peers.values():
            peer.close()
        tmp.cleanup()

    summary = {}

    def compare(mine: str, ref: str, n: int, metric: str = "tokens_per_s", label: str = "throughput") -> None:
        if (mine, n) not in per_round or (ref, n) not in per_round:
            return
        ours_r, ref_r = per_round[(mine, n)], per_round[(ref, n)]
        tput = ratios([r[metric] for r in ours_r], [r[metric] for r in ref_r])
        ttft = ratios([r["ttft_p50"] for r in ref_r], [r["ttft_p50"] for r in ours_r])
        summary[f"{mine}/{ref}@{n}" + ("" if metric == "tokens_per_s" else f":{metric}")] = {label: tput,
                                                                                         "ttft_lower": ttft}
        print(f"{mine}/{ref}: {label} {fmt(tput, digits=2, unit='x')}, "
              f"TTFT p50 {fmt(ttft, digits=2, unit='x')} lower (per-round ratios)")

    for n in levels:
        print(f"\n== {n} concurrent stream(s): median (min-max) over {args.repeat} rounds ==")
        print(f"{'':<22}" + "".join(f"{label:>26}" for _, label, *_ in METRICS))
        for (name, k), rows in per_round.items():
            if k != n:
                continue
            stats = {m: spread([r[m] for r in rows]) for m, *_ in METRICS}
            summary[f"{name}@{n}"] = stats
            print(f"{name:<22}" + "".join(f"{fmt(stats[m], scale, digits, unit):>26}"
                                          for m, _, scale, digits, unit in METRICS))
        for mine in servers:
            for peer in ("hf-batch", "hf-seq"):
                compare(mine, peer, n)
        for v in variants:   # each feature on vs off
            compare(f"lmforge-{v}", "lmforge", n)
        compare("lmforge-int4", "lmforge-int4-pt", n)   # lmforge's int4 kernel vs PyTorch's
        for kind, v in LLAMA_TYPES.items():
            compare(f"lmforge-{v}", f"llama.cpp-{kind}", n)
            compare(f"lmforge-{v}", f"llama.cpp-{kind}", n, "decode_tok_s", "decode tok/s")
    write_json(args.json, "serve",
               {"model": str(args.model), "device": args.device, "dtype": args.dtype, "concurrency": levels,
                "max_tokens": args.max_tokens, "repeat": args.repeat, "seq_requests": args.seq_requests,
                "compile": args.compile, "threads": args.threads, "variants": variants,
                "llama_cpp": bool(peers),
                "ttft": "lmforge/hf-batch: from common submit time t0; hf-seq: from the request's own start"},
               {f"{name}@{n}": rows for (name, n), rows in per_round.items()}, summary)


if __name__ == "__main__":
    main()
