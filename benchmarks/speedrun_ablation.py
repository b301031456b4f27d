"""Speedrun ablations: short pretraining runs at an equal token budget, one change each against the
speedrun recipe, scored by held-out bits per byte (comparable across vocabularies).

    python benchmarks/speedrun_ablation.py                       # every variant, 100 steps each
    python benchmarks/speedrun_ablation.py --steps 60 --only baseline,muon --json out.json

The corpus, cleaning, tokenizer and shards come from the speedrun's own stages (reused from
--root when their fingerprints match); each variant then trains from scratch with the same seed
and is scored on the same held-out tokens. Budgets are equal in tokens (steps x batch), not in
seconds, so a loaded machine changes the times column but not the bits per byte.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import write_json  # noqa: E402

from lmforge.config import load_recipe  # noqa: E402
from lmforge.data.shards import TokenShards  # noqa: E402
from lmforge.eval.bpb import bits_per_byte  # noqa: E402
from lmforge.model import load  # noqa: E402
from lmforge.speedrun import SpeedrunRecipe, run_stages  # noqa: E402
from lmforge.train.config import TrainRecipe  # noqa: E402
from lmforge.train.trainer import train  # noqa: E402

RECIPE = Path(__file__).parents[1] / "src" / "lmforge" / "recipes" / "cpu-tiny.yaml"
DATA_STAGES = ("corpus", "clean", "tokenizer", "shards")

# name -> (what it tests, overrides). `steps*` scales the step count so the token budget stays equal.
# Depth vs width: tiny is 4 layers x 256 (~12 L d^2 = 3.1 M non-embedding FLOP/token at T=256);
# 6 x 192 is 0.84x and 2 x 384 is 0.94x of that.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("cpu-tiny.yaml as shipped (Muon 0.02 + AdamW 3e-3, WSD 10 %)", []),
    "adamw": ("optimizer: AdamW (lr 3e-3) for every weight", ["train.optimizer=adamw"]),
    "muon-lr0.04": ("Muon lr 0.04", ["train.muon_lr=0.04"]),
    "muon-lr0.01": ("Muon lr 0.01", ["train.muon_lr=0.01"]),
    "lr-x2": ("AdamW part (embeddings, norms) lr 6e-3", ["train.lr=0.006"]),
    "lr-x0.5": ("AdamW part (embeddings, norms) lr 1.5e-3", ["train.lr=0.0015"]),
    "cosine": ("schedule: cosine instead of WSD", ["train.schedule=cosine"]),
    "wsd-decay0.3": ("WSD with a 30 % decay phase", ["train.decay=0.3"]),
    "wsd-decay0.5": ("WSD with a 50 % decay phase", ["train.decay=0.5"]),
    "deep-narrow": ("6 layers x 192 (0.84x FLOPs)", ["model.depth=6", "model.dim=192", "model.n_heads=3",
                                                    "model.n_kv_heads=3", "train.lr=0.003"]),
    "shallow-wide": ("2 layers x 384 (0.94x FLOPs)", ["model.depth=2", "model.dim=384", "model.n_heads=6",
                                                     "model.n_kv_heads=3", "train.lr=0.003"]),
    "untied": ("untied embedding and LM head", ["model.tie_embeddings=false"]),
    "seq512": ("sequence length 512 (same tokens per step)", ["model.max_seq_len=512", "train.seq_len=512",
                                                             "train.micro_batch=16"]),
    "batch4k": ("4,096-token steps, twice as many", ["train.global_batch_tokens=4096", "train.micro_batch=16",
                                                     "steps*2"]),
    "batch16k": ("16,384-token steps, half as many", ["train.global_batch_tokens=16384", "steps*0.5"]),
    "vocab2048": ("vocabulary 2,048", ["run.vocab_size=2048"]),
    "vocab8192": ("vocabulary 8,192", ["run.vocab_size=8192"]),
    "no-dedup": ("data order: exact and near dedup off", ["data.exact.enabled=false", "data.near.enabled=false"]),
    "z-loss": ("z-loss 1e-4 (PaLM)", ["train.z_loss=0.0001"]),
    "qk-norm": ("QK-norm: per-head RMSNorm of q and k", ["model.qk_norm=true"]),
    "softcap": ("logit soft-cap 15 (Gemma 2 uses 30)", ["model.logit_softcap=15"]),
}


def prepare(root: Path, run_overrides: list[str], console: Console):
    """The speedrun's data stages for these run.* and data.* settings, in their own folder under root."""
    name = "data-" + ("-".join(o.split(".", 1)[1].replace("=", "") for o in run_overrides) or "default")
    recipe = load_recipe(SpeedrunRecipe, RECIPE, [*run_overrides, f"run.root={root}", f"run.name={name}"])
    stages = run_stages(recipe, console, DATA_STAGES)
    return stages.dir / "data", stages.tok


def run_variant(name: str, overrides: list[str], steps: int, eval_tokens: int, root: Path, console: Console) -> dict:
    scale = next((float(o[6:]) for o in overrides if o.startswith("steps*")), 1.0)
    run_opts = [o for o in overrides if o.startswith(("run.", "data."))]
    train_opts = [o for o in overrides if not o.startswith(("run.", "data.", "steps*"))]
    data, tok = prepare(root, run_opts, console)
    base = load_recipe(SpeedrunRecipe, RECIPE, train_opts)
    out = root / "variants" / name
    shutil.rmtree(out, ignore_errors=True)
    base.train.data, base.train.out = str(data), str(out)
    base.train.max_steps = max(1, round(steps * scale))
    base.train.eval_every = base.train.ckpt_every = base.train.max_steps
    base.train.tensorboard = False
    base.train.eval_tokens = 4096  # the trainer's own held-out check; the score below is the bpb
    t = time.perf_counter()
    summary = train(TrainRecipe(model=base.model, train=base.train), console=console)
    seconds = time.perf_counter() - t
    val = TokenShards(data, "val")
    n = min(len(val) - 1, eval_tokens)
    score = bits_per_byte(load(summary["model_dir"]), val.slice(0, n + 1), tok.token_byte_lengths(),
                          seq_len=base.train.seq_len, batch_size=16)
    return {"variant": name, "overrides": overrides, "bpb": score["bpb"], "train_seconds": round(seconds, 1),
            "params": summary["params"], "tokens": summary["tokens_seen"], "steps": base.train.max_steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="steps per variant at 8,192 tokens (the baseline's)")
    ap.add_argument("--eval-tokens", type=int, default=131072, help="held-out tokens scored per variant")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--root", default="runs/ablation")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    console = Console(stderr=True)
    results = []
    for name in names:
        results.append(run_variant(name, VARIANTS[name][1], args.steps, args.eval_tokens, Path(args.root), console))
        console.print(f"[bold]{name}[/]: {results[-1]['bpb']:.4f} bits/byte")
    base = next((r["bpb"] for r in results if r["variant"] == "baseline"), None)
    table = Table(title=f"speedrun ablation: {args.steps} steps x 8,192 tokens each, held-out bits per byte")
    for col in ("variant", "change", "bpb", "vs baseline", "train s"):
        table.add_column(col, justify="right" if col in ("bpb", "vs baseline", "train s") else "left")
    for r in sorted(results, key=lambda r: r["bpb"]):
        delta = f"{r['bpb'] - base:+.4f}" if base is not None else "-"
        table.add_row(r["variant"], VARIANTS[r["variant"]][0], f"{r['bpb']:.4f}", delta, f"{r['train_seconds']:.0f}")
    Console().print(table)
    if args.json:
        write_json(args.json, "speedrun_ablation", {"steps": args.steps, "eval_tokens": args.eval_tokens},
                   {r["variant"]: r for r in results}, {r["variant"]: r["bpb"] for r in results})


if __name__ == "__main__":
    main()
