"""Safety figures for the README: the guard per held-out family, streaming PII recall and Presidio
agreement, attack success through `lmforge serve` (SmolLM2-135M-Instruct, canary system prompt)
with and without `--guard`, and the guard's latency against a 64-token generation.

    PYTHONPATH=src python benchmarks/safety.py [--parts guard,pii,e2e,latency] [--per-family 15]

CPU timings on a shared machine are noisy; the attack rates are deterministic (greedy decoding).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import subprocess
import sys
import time

import numpy as np


def part_guard(args) -> dict:
    from lmforge.safety.training import held_out_table, summary
    rows = held_out_table(seed=0)
    for r in rows:
        print(f"  {r['family']:<12} AUC {r['auc']:.3f}  TPR@1%FPR {r['tpr_at_fpr']:.3f}   "
              f"(rules alone: AUC {r['rules_auc']:.3f}, TPR {r['rules_tpr_at_fpr']:.3f})")
    s = summary(rows)
    print(f"  mean         AUC {s['auc']:.3f}  TPR@1%FPR {s['tpr_at_fpr']:.3f}   (rules alone: AUC {s['rules_auc']:.3f}, "
          f"TPR {s['rules_tpr_at_fpr']:.3f})")
    return {"families": rows, "mean": s}


def part_pii(args) -> dict:
    from faker import Faker

    from lmforge.data.pii_eval import presidio_detector
    from lmforge.safety.output_pii import reply_pii_finder
    from lmforge.safety.stream_redact import StreamRedactor
    locales = ("en_US", "en_GB", "de_DE", "fr_FR", "it_IT")
    kinds = {"email": "email", "phone_number": "phone", "ipv4_public": "ip_address",
             "credit_card_number": "credit_card", "iban": "iban"}
    rng, finder, presidio = random.Random(0), reply_pii_finder(), presidio_detector(locales)
    leaked, total, agree = 0, 0, {k: {"both": 0, "ours_only": 0, "presidio_only": 0, "neither": 0} for k in kinds.values()}
    for loc in locales:
        f = Faker(loc)
        f.seed_instance(1)
        for _ in range(args.pii_per_locale):
            for method, kind in kinds.items():
                value = getattr(f, method)()
                text = rng.choice(["Reach me at {v} today.", "{v}", "Details: {v}, thanks.", "ok ({v})"]).format(v=value)
                at = text.index(value)
                r = StreamRedactor(finder)
                cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 8))))
                bounds = [0, *cuts, len(text)]
                sent = [r.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [r.finish()]
                total += 1
                leaked += value in "".join(sent)
                ours = any(s <= at and at + len(value) <= e for s, e, _ in finder(text))
                theirs = any(s <= at and at + len(value) <= e for s, e, _ in presidio(text))
                agree[kind][{(1, 1): "both", (1, 0): "ours_only", (0, 1): "presidio_only", (0, 0): "neither"}[(ours, theirs)]] += 1
    recall = 1 - leaked / total
    print(f"  streamed with random chunking: {total} Faker values, recall {recall:.4f} ({leaked} leaked)")
    for kind, c in agree.items():
        n = sum(c.values())
        print(f"  {kind:<12} both {c['both']:>4}  ours only {c['ours_only']:>4}  presidio only {c['presidio_only']:>4}  "
              f"neither {c['neither']:>3}  agreement {(c['both'] + c['neither']) / n:.3f}")
    return {"values": total, "recall": recall, "agreement": agree}


def _serve(extra: list[str], port: int):
    env = {**os.environ, "OMP_NUM_THREADS": str(args_threads)}
    p = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--port", str(port), "--threads", str(args_threads),
                          "--max-num-seqs", "4", *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = p.stdout.readline()
    if "serving" not in line:
        p.kill()
        raise SystemExit(f"lmforge serve did not start: {line!r}")
    return p, re.search(r"http://\S+?:\d+", line).group()


def part_e2e(args) -> dict:
    from lmforge.safety.attacks import attacks
    from lmforge.safety.benign import benign
    from lmforge.safety.judges import make_canary
    from lmforge.safety.redteam import report, run
    from lmforge.safety.targets import EndpointTarget
    atk, ben, canary = attacks(args.per_family, 0), benign(args.benign, 0), make_canary(0)
    out = {}
    for name, flags in (("no guard", []), ("guard", ["--guard"])):
        proc, url = _serve(flags, args.port)
        try:
            t = time.time()
            rep = report(run(EndpointTarget(url, max_tokens=args.max_tokens, timeout=1800), atk, canary, workers=4) +
                         # benign prompts only need the guard's verdict: one token each
                         (run(EndpointTarget(url, max_tokens=1, timeout=1800), ben, canary, workers=4) if flags else []))
            rep["seconds"] = time.time() - t
        finally:
            proc.terminate()
            proc.wait(30)
        a = rep["attacks"]
        print(f"  {name:<9} attack success {a['asr']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] over {a['n']} attacks"
              + (f"; benign blocked {rep['benign']['blocked']:.3f} of {rep['benign']['n']}" if "benign" in rep else ""))
        for r in rep["families"]:
            print(f"      {r['family']:<12} {r['asr']:.2f}")
        out[name] = rep
    base, guarded = out["no guard"]["attacks"]["asr"], out["guard"]["attacks"]["asr"]
    print(f"  cut: {base:.3f} -> {guarded:.3f} ({base / guarded:.1f}x)" if guarded else f"  cut: {base:.3f} -> 0")
    return out


def part_latency(args) -> dict:
    import torch

    from lmforge.model import load_pretrained
    from lmforge.model.sampling import generate
    from lmforge.safety.attacks import attacks
    from lmforge.safety.benign import benign
    from lmforge.safety.guard import Guard
    from lmforge.safety.judges import make_canary, system_prompt
    from lmforge.safety.training import train_default
    torch.set_num_threads(args_threads)
    guard = Guard(train_default())
    loaded = load_pretrained(None, None, "auto", "cpu")
    prompts = benign(100, 1) + attacks(10, 1)
    system = {"role": "system", "content": system_prompt(make_canary(0))}
    gen_times = []
    for p in prompts[:3]:
        ids = loaded.tokenizer.encode_chat([system, *p.messages])
        t = time.perf_counter()
        toks = list(generate(loaded.model, ids, 64, temperature=0.0))
        gen_times.append(time.perf_counter() - t)
        reply = loaded.tokenizer.decode(toks)
    guard_times = []
    for p in prompts:
        messages = [system, *p.messages]
        t = time.perf_counter()
        guard.check_messages(messages)
        guard.filter_output(reply, messages)
        guard_times.append(time.perf_counter() - t)
    g, m = float(np.median(guard_times)), float(np.median(gen_times))
    print(f"  guard per request (input check + output filter of a 64-token reply): median {g * 1e3:.1f} ms; "
          f"64-token generation: median {m * 1e3:.0f} ms; ratio {g / m:.2%}")
    return {"guard_s": g, "generate_64_s": m, "ratio": g / m}


PARTS = {"guard": part_guard, "pii": part_pii, "e2e": part_e2e, "latency": part_latency}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="guard,pii,e2e,latency")
    ap.add_argument("--per-family", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--benign", type=int, default=150)
    ap.add_argument("--pii-per-locale", type=int, default=60)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    args_threads = a.threads
    logging.getLogger("lmforge.safety.guard").setLevel(logging.ERROR)  # one log line per decision otherwise
    results = {}
    for part in a.parts.split(","):
        print(f"[{part}]")
        results[part] = PARTS[part](a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
