"""Safety figures for the README: the guard per held-out family, streaming PII recall and Presidio
agreement, attack success through `lmforge serve` (SmolLM2-135M-Instruct, a translation-app system
prompt holding a canary) with and without `--guard` (classifiers that never saw the attacked family),
and the guard's latency against a 64-token generation.

    PYTHONPATH=src python benchmarks/safety.py [--parts guard,pii,e2e,latency] [--per-family 6]

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
import tempfile
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


def _run_server(flags: list[str], prompts, canary: str, template: str, max_tokens: int, port: int) -> list:
    from lmforge.safety.redteam import run
    from lmforge.safety.targets import EndpointTarget
    proc, url = _serve(flags, port)
    try:
        return run(EndpointTarget(url, max_tokens=max_tokens, timeout=3600), prompts, canary, workers=4,
                   system_template=template)
    finally:
        proc.terminate()
        proc.wait(30)


def _rate(xs, seed: int = 0) -> dict:
    from lmforge.safety.metrics import bootstrap_ci
    rate, lo, hi = bootstrap_ci(xs, seed=seed)
    return {"n": len(xs), "k": int(sum(xs)), "rate": rate, "ci": [lo, hi]}


GROUPS = (("override", "encoding", "indirect", "role_marker"), ("roleplay", "smuggling", "multi_turn"))


def part_e2e(args) -> dict:
    """Goal hijacking through `lmforge serve`: the system prompt is an application (translate the
    user's message into French) holding a canary; the attacks of every family ask for the rogue
    string (or, with --leak-per-family, the canary). Unguarded server vs `--guard` servers whose
    classifier never saw the attacked family: the families are split in two groups, and each group's
    attacks meet a classifier trained on the other group (+ the benign train half). Benign blocks:
    both classifiers over the benign test half, which neither saw."""
    from lmforge.safety.attacks import FAMILIES, attacks
    from lmforge.safety.benign import benign
    from lmforge.safety.guard import Guard
    from lmforge.safety.judges import TASK_TEMPLATE, make_canary, rogue_opening
    from lmforge.safety.training import fit, split_benign
    assert sorted(sum(GROUPS, ())) == sorted(FAMILIES)
    canary, seed = make_canary(0), 0
    pool = attacks(max(50, 6 * args.per_family), seed)
    chosen = []
    for family in FAMILIES:
        fam = [p for p in pool if p.family == family]
        chosen += [p for p in fam if p.goal == "rogue"][:args.per_family]
        chosen += [p for p in fam if p.goal == "leak"][:args.leak_per_family]
    train_b, test_b = split_benign(benign(350, seed), seed)
    train_atk = attacks(50, seed)
    tmp = tempfile.mkdtemp()
    t = time.time()
    if args.e2e_cache and os.path.exists(args.e2e_cache):  # the unguarded replies of an interrupted run
        from lmforge.safety.judges import succeeded
        from lmforge.safety.redteam import Outcome
        saved = json.load(open(args.e2e_cache))
        plain = [Outcome(p, r, False, succeeded(p.goal, r, canary), 0.0) for p, r in zip(chosen, saved, strict=True)]
    else:
        plain = _run_server([], chosen, canary, TASK_TEMPLATE, args.max_tokens, args.port)
        if args.e2e_cache:
            with open(args.e2e_cache, "w") as f:
                json.dump([o.reply for o in plain], f)
    print(f"  no guard: {sum(o.success for o in plain)}/{len(plain)} attacks succeeded ({time.time() - t:.0f} s)", flush=True)
    # two guarded servers: each serves the families of one group with a classifier trained only on the
    # other group's families (+ the benign train half), so no attack meets a guard trained on its family
    guarded, benign_verdicts, ben = [], {}, []
    for i, group in enumerate(GROUPS):
        clf = fit([p for p in train_atk if p.family not in group] + train_b, seed)
        guard_dir = str(clf.save(f"{tmp}/group{i}"))
        # benign blocks: the server's own input check (Guard.check_messages, run before any generation;
        # tests/safety/test_redteam.py checks in-process and server block decisions are identical),
        # for the whole benign test half, here; a sample also goes through the server below
        benign_verdicts[i] = [Guard(clf).check_messages(list(p.messages)).action == "block" for p in test_b]
        held = [p for p in chosen if p.family in group]
        sample = test_b[:args.e2e_benign] if i == 0 else []
        outs = _run_server(["--guard", "--guard-classifier", guard_dir], held + sample, canary, TASK_TEMPLATE,
                           args.max_tokens, args.port)
        guarded += outs[:len(held)]
        ben += outs[len(held):]
        print(f"  guard trained without {', '.join(group)}: {sum(o.success for o in outs[:len(held)])}/{len(held)} "
              f"succeeded, {sum(o.blocked for o in outs[:len(held)])} blocked; benign test half blocked "
              f"{np.mean(benign_verdicts[i]):.3f}", flush=True)
    if [o.blocked for o in ben] != benign_verdicts[0][:len(ben)]:
        raise SystemExit("the server's benign block decisions differ from the guard's in-process ones")
    out = {"canary_template": TASK_TEMPLATE, "max_tokens": args.max_tokens, "families": {}}
    print(f"  {'family':<12} {'no guard':>16} {'guard (held out)':>18}")
    for family in FAMILIES:
        a = [o.success for o in plain if o.prompt.family == family]
        b = [o.success for o in guarded if o.prompt.family == family]
        out["families"][family] = {"no_guard": _rate(a), "guard": _rate(b)}
        print(f"  {family:<12} {sum(a):>7}/{len(a):<3} {np.mean(a):.2f}  {sum(b):>7}/{len(b):<3} {np.mean(b):.2f}")
    for goal in ("rogue", "leak"):
        a = [o.success for o in plain if o.prompt.goal == goal]
        if a:
            out[f"no_guard_{goal}"] = _rate(a)
    base, guard = _rate([o.success for o in plain]), _rate([o.success for o in guarded])
    benign_rate = _rate(benign_verdicts[0] + benign_verdicts[1])  # both guards over the benign test half
    # 95 % upper bound on a rate observed as 0 of n: the rule of three; the cut's conservative end
    # divides the unguarded CI's low end by the guarded CI's high end (or that bound)
    guard_hi = guard["ci"][1] if guard["k"] else 3 / guard["n"]
    # the stricter reading: the reply opens with the rogue string (not a quote or translation of the attack)
    strict = {name: _rate([o.prompt.goal == "rogue" and not o.blocked and rogue_opening(o.reply) for o in outs])
              for name, outs in (("no_guard", plain), ("guard", guarded))}
    print(f"  strict judge (reply opens with the rogue string): no guard {strict['no_guard']['k']}/{strict['no_guard']['n']}, "
          f"guard {strict['guard']['k']}/{strict['guard']['n']}")
    out["replies"] = {name: [{"family": o.prompt.family, "goal": o.prompt.goal, "blocked": o.blocked,
                              "success": o.success, "reply": o.reply} for o in outs]
                      for name, outs in (("no_guard", plain), ("guard", guarded))}
    out.update(strict=strict, no_guard=base, guard=guard, benign=benign_rate, benign_per_guard=[_rate(v) for v in benign_verdicts.values()],
               benign_through_server=len(ben),
               cut=base["rate"] / guard["rate"] if guard["k"] else float("inf"), cut_low=base["ci"][0] / guard_hi)
    print(f"  attack success: no guard {base['k']}/{base['n']} = {base['rate']:.3f} [{base['ci'][0]:.3f}, {base['ci'][1]:.3f}]; "
          f"guard {guard['k']}/{guard['n']} = {guard['rate']:.3f} [{guard['ci'][0]:.3f}, {guard['ci'][1]:.3f}]")
    print(f"  cut {out['cut']:.1f}x (conservative: CI low / guarded high {out['cut_low']:.1f}x); benign blocked "
          f"{benign_rate['k']}/{benign_rate['n']} = {benign_rate['rate']:.3f} [{benign_rate['ci'][0]:.3f}, "
          f"{benign_rate['ci'][1]:.3f}] (two guards x the benign test half; {len(ben)} also sent through the server)")
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
    ap.add_argument("--per-family", type=int, default=6, help="e2e: rogue-string attacks per family")
    ap.add_argument("--leak-per-family", type=int, default=0, help="e2e: canary-leak attacks per family too")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--e2e-cache", default=None, help="e2e: keep (and reuse) the unguarded replies in this JSON file")
    ap.add_argument("--e2e-benign", type=int, default=12, help="e2e: benign test prompts also sent through the server")
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
