"""The llama.cpp side of benchmarks/serve.py, run by another venv's python (llama-cpp-python), in its
own process: torch and ggml each bring their own OpenMP/thread pools and must not share one.

    /work/llamacpp-venv/bin/python benchmarks/llama_cpp_peer.py MODEL.gguf THREADS

Reads one JSON request per stdin line, {"prompt": [token ids], "max_tokens": n}, and answers one
JSON line per request on stdout: {"ttft": s, "gaps": [s...], "tokens": n} (greedy, EOS ignored, a
fresh KV cache for every request: no prompt reuse between rounds). Prints {"ready": true} once the
model is loaded. Standard library + llama_cpp only.
"""
from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from llama_cpp import Llama
    path, threads = sys.argv[1], int(sys.argv[2])
    llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False, logits_all=False)
    print(json.dumps({"ready": True, "version": __import__("llama_cpp").__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        llm.reset()   # n_tokens = 0: generate() then finds no cached prefix and prefills the whole prompt
        stamps, n = [], 0
        t0 = time.perf_counter()
        for _ in llm.generate(req["prompt"], temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                              reset=True):
            stamps.append(time.perf_counter())
            n += 1
            if n >= req["max_tokens"]:
                break
        print(json.dumps({"ttft": stamps[0] - t0, "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
                          "tokens": n}), flush=True)


if __name__ == "__main__":
    main()
