"""Log-likelihood throughput: lmforge's in-process backend vs lm-evaluation-harness's HF backend,
same model, same requests, same process, printing items/s and the ratio (target >= 2x).

    python benchmarks/eval.py                      # SmolLM2-135M-Instruct (bundled GGUF), CPU
    python benchmarks/eval.py --questions 64 --device cuda --hf-batch-size 32 --json eval.json

Each workload runs both sides once per round, the order rotating each round, for --repeat rounds;
printed: median items/s (min-max) per side and the median per-round ratio (min-max).

The model is loaded by lmforge (GGUF -> float32) and written once as a Hugging Face directory,
which lm-eval's `hf` model then loads through transformers: both score identical weights.
Two workloads of synthetic (self-generated) multiple-choice questions:
  letters - 5-shot MMLU-style prompts (fixed examples per subject, as lm-eval's MMLU), four
            one-token continuations (" A".." D")
  cloze   - 3-shot ARC-style prompts (examples drawn per question), four multi-token answers
Also checked, and the run fails (exit 1) otherwise: every per-request log-likelihood agrees within
--tolerance (nats, absolute; default 1e-4), and every question's argmax agrees. The max |difference|
is printed and written to the JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

from common import fmt, interleave, inverse, ratios, spread, write_json

WORDS = ("river lantern harbour garden teacher engine valley window market letter mountain bridge "
         "orchard violin compass kettle ladder meadow carpet pigeon").split()
ADJ = "quiet green distant old bright narrow heavy gentle busy patient sudden wooden".split()


def question(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = rng.sample(WORDS, 2)
    stem = (f"A {rng.choice(ADJ)} {a} stands beside a {rng.choice(ADJ)} {b}. The {a} was built "
            f"{rng.randint(2, 90)} years ago by a {rng.choice(ADJ)} {rng.choice(WORDS)}. What is next to the {a}?")
    choices = [f"the {rng.choice(ADJ)} {w}" for w in rng.sample([w for w in WORDS if w != b], 3)]
    answer = rng.randrange(4)
    choices.insert(answer, f"the {rng.choice(ADJ)} {b}")
    return stem, choices, answer


def render(kind: str, stem: str, choices: list[str], answer: int | None) -> tuple[str, list[str]]:
    """(prompt block, continuations); with an answer, the block is a solved few-shot example."""
    if kind == "letters":
        body = stem + "".join(f"\n{'ABCD'[i]}. {c}" for i, c in enumerate(choices)) + "\nAnswer:"
        conts = [f" {'ABCD'[i]}" for i in range(4)]
    else:
        body, conts = f"Question: {stem}\nAnswer:", [f" {c}" for c in choices]
    return (body + conts[answer] + "\n\n" if answer is not None else body), conts


def workload(kind: str, n: int, seed: int = 0, subjects: int = 4) -> list[list[tuple[str, str]]]:
    """n questions, each a list of (context, continuation) requests sharing one context.
    letters: like MMLU in lm-eval, every question of a subject has the same 5 solved examples;
    cloze: like ARC in lm-eval, each question gets its own 3 randomly drawn examples."""
    rng = random.Random(f"{kind}:{seed}")
    fixed = [[render(kind, *question(rng))[0] for _ in range(5)] for _ in range(subjects)]
    out = []
    for q in range(n):
        shots = fixed[q % subjects] if kind == "letters" else [render(kind, *question(rng))[0] for _ in range(3)]
        stem, choices, _ = question(rng)
        body, conts = render(kind, stem, choices, None)
        header = f"The following are questions about subject {q % subjects}.\n\n" if kind == "letters" else ""
        out.append([(header + "".join(shots) + body, c) for c in conts])
    return out


def prepare_hf_dir(model, tok, directory: Path) -> Path:
    from lmforge.model import save_hf

    save_hf(model, directory)
    tok.save(directory)
    eos = tok.hf.id_to_token(tok.eos_id) if tok.eos_id is not None else None
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": model.cfg.max_seq_len}))
    return directory


def answers(scores: list[tuple[float, bool]], n_questions: int) -> list[int]:
    """The chosen (highest log-likelihood) choice of each 4-choice question."""
    return [max(range(4), key=lambda i: scores[4 * q + i][0]) for q in range(n_questions)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="any model lmforge.model.load accepts (default: bundled SmolLM2-135M GGUF)")
    ap.add_argument("--questions", type=int, default=48, help="questions per workload (4 requests each)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hf-batch-size", default="16", help="lm-eval HF batch size (an int or 'auto')")
    ap.add_argument("--workloads", default="letters,cloze")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds per workload")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="max allowed |log-likelihood difference| per request, nats")
    ap.add_argument("--json", type=Path, help="also write config, raw timings and summary here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        sys.exit(f"lm-evaluation-harness (with its HF backend) is not installed: pip install 'lm-eval[hf]' ({e})")

    from lmforge.eval.local_backend import LocalBackend
    from lmforge.model import load
    from lmforge.tokenizer import load_tokenizer

    ref = args.model
    if ref is None:
        from lmforge.gguf_file import bundled_smollm2
        ref = str(bundled_smollm2())
    model = load(ref, device=args.device)
    tok = load_tokenizer(ref)
    ours = LocalBackend(model, tok, name=ref)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = prepare_hf_dir(model, tok, Path(tmp) / "hf")
        batch = args.hf_batch_size if args.hf_batch_size == "auto" else int(args.hf_batch_size)
        theirs = HFLM(pretrained=str(hf_dir), device=args.device, batch_size=batch, dtype="float32")
        print(f"model {ref} ({model.num_params() / 1e6:.0f}M params) on {args.device}, torch threads "
              f"{torch.get_num_threads()}, lm-eval HF batch size {args.hf_batch_size}")
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
        summary, raw, failures = {}, {}, []
        for kind in args.workloads.split(","):
            questions = workload(kind, args.questions)
            requests = [r for q in questions for r in q]
            instances = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)]
            ours.loglikelihood(requests[:8])  # warm-up, both sides
            theirs.loglikelihood(instances[:8], disable_tqdm=True)
            times, out = interleave({"lmforge": lambda: ours.loglikelihood(requests),
                                     "lm-eval HF": lambda: theirs.loglikelihood(instances, disable_tqdm=True)},
                                    args.repeat, sync)
            mine, ref_out = out["lmforge"], out["lm-eval HF"]
            diff = max(abs(a[0] - b[0]) for a, b in zip(mine, ref_out))
            same = sum(x == y for x, y in zip(answers(mine, len(questions)), answers(ref_out, len(questions))))
            tokens = sum(len(tok.encode(c + x)) for c, x in requests)
            n = len(requests)
            s_ours, s_hf = spread(times["lmforge"]), spread(times["lm-eval HF"])
            speedup = ratios(times["lm-eval HF"], times["lmforge"])
            raw[kind] = times
            summary[kind] = {"requests": n, "tokens": tokens, "lmforge_s": s_ours, "lm_eval_hf_s": s_hf,
                             "lmforge_items_per_s": inverse(s_ours, n), "lm_eval_hf_items_per_s": inverse(s_hf, n),
                             "speedup": speedup, "max_abs_logprob_diff": diff, "tolerance": args.tolerance,
                             "same_argmax": f"{same}/{len(questions)}"}
            print(f"{kind:8s} {n} requests ({tokens} tokens), median (min-max) of {args.repeat} rounds: "
                  f"lmforge {fmt(inverse(s_ours, n), digits=1)} items/s, lm-eval HF {fmt(inverse(s_hf, n), digits=1)} "
                  f"items/s -> {fmt(speedup, digits=2, unit='x')}; max |dlogp| {diff:.2e} "
                  f"(tolerance {args.tolerance:.0e}), same answer {same}/{len(questions)}")
            if diff > args.tolerance:
                failures.append(f"{kind}: max |dlogp| {diff:.2e} > tolerance {args.tolerance:.0e}")
            if same != len(questions):
                failures.append(f"{kind}: answers differ on {len(questions) - same} questions")
    write_json(args.json, "eval",
               {"model": ref, "device": args.device, "questions": args.questions, "workloads": args.workloads,
                "hf_batch_size": args.hf_batch_size, "repeat": args.repeat, "tolerance": args.tolerance},
               {"seconds": raw}, summary)
    if failures:
        sys.exit("agreement check failed: " + "; ".join(failures))

if __name__ == "__main__":
    main()
