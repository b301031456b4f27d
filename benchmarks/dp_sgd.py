"""DP-SGD: canary exposure with and without DP, and the per-example-gradient step time vs opacus.

1. Canary exposure (Carlini et al. 2019): a byte-level 2-layer lmforge model trained on the first
   ~130 KB of the stdlib with a secret 4-digit PIN planted in 8 windows; exposure of the PIN after
   plain Adam vs DP-SGD (Poisson sampling, clipping, noise calibrated by our RDP accountant to the
   target ε at δ=1e-5), same steps and expected batch.
2. Step time: per-example gradients + clipping of one batch, ours (torch.func vmap) vs opacus'
   GradSampleModule hooks, on the same model and batch (interleaved rounds; medians).
3. Utility cost (`--parts tiny`): the speedrun's tiny preset (its recipe, AdamW) pretrained on the
   stdlib shards for the same steps without DP and with DP-SGD at ε = 1 (δ = 1e-5, through
   `lmforge.safety.dp_sgd.dp_train`, as `lmforge safety dp-train` runs it); held-out bits per byte of each.
Timings on a shared, busy CPU are noisy: compare the sides, not the absolute figures.

    PYTHONPATH=src python benchmarks/dp_sgd.py [--steps 200] [--epsilon 8] [--json out.json]
    PYTHONPATH=src python benchmarks/dp_sgd.py --parts tiny --tiny-steps 30 --tiny-batch-tokens 2048 --tiny-epsilon 1
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, interleave, ratios, spread, write_json

from lmforge.model import ModelConfig, Transformer
from lmforge.safety.accountant import epsilon, noise_for_epsilon
from lmforge.safety.dp_sgd import clip_and_sum, per_sample_gradients
from lmforge.safety.dp_sgd_canary import (
    canary_windows,
    exposure,
    stdlib_bytes,
    train_on_windows,
)

CFG = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=64)
SECRET = "4821"


def canary_run(steps: int, target_eps: float, batch: int, clip: float) -> dict:
    windows = canary_windows(stdlib_bytes(130_000), SECRET, copies=8, width=48)
    q = batch / len(windows)
    sigma = noise_for_epsilon(target_eps, q, steps, 1e-5)
    out = {"windows": len(windows), "q": q, "sigma": sigma, "epsilon": epsilon(q, sigma, steps, 1e-5)[0]}
    for name, dp in (("plain", None), ("dp", (sigma, clip))):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**CFG))
        train_on_windows(model, windows, steps, batch, 3e-3, seed=0, dp=dp)
        out[f"exposure_{name}"] = exposure(model, SECRET)
        print(f"{name}: exposure {out[f'exposure_{name}']:.2f} bits (max log2(10^4) = 13.29)",
              flush=True)
    return out


def step_time(batch: int, repeat: int) -> dict:
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG))  # untied: opacus' hooks need one module per parameter
    rows = torch.randint(0, 256, (batch, 49))
    peer = GradSampleModule(Transformer(ModelConfig(**CFG)))
    peer._module.load_state_dict(model.state_dict())

    def ours():
        _, grads = per_sample_gradients(model, lambda fwd, b: fwd(b[:, :-1], targets=b[:, 1:]), rows)
        return clip_and_sum(grads, 1.0)[0]

    def opacus():
        peer.zero_grad(set_to_none=True)
        logits = peer(rows[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), rows[:, 1:].reshape(-1), reduction="none")
        loss.view(batch, -1).mean(1).sum().backward()  # sum of per-example means: grad_sample = each example's
        grads = {n: p.grad_sample for n, p in peer._module.named_parameters()}
        return clip_and_sum(grads, 1.0)[0]

    mine, theirs = ours(), opacus()
    agree = max(float((mine[n] - theirs[n]).abs().max()) for n in mine)
    times, _ = interleave({"ours": ours, "opacus": opacus}, repeat)
    return {"max_abs_diff_clipped_sum": agree, "ours_s": spread(times["ours"]), "opacus_s": spread(times["opacus"]),
            "ratio_opacus_over_ours": ratios(times["opacus"], times["ours"])}


def tiny_bpb(steps: int, target_eps: float, documents: int, root: str, batch_tokens: int) -> dict:
    """Held-out bpb of the tiny preset after `steps` steps, non-private vs DP-SGD at `target_eps`."""
    from rich.console import Console

    from lmforge.config import load_recipe
    from lmforge.data.shards import TokenShards
    from lmforge.eval.bpb import bits_per_byte
    from lmforge.model import load
    from lmforge.safety.dp_sgd import dp_train
    from lmforge.speedrun import STAGES, SpeedrunRecipe, run_stages
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.config import TrainRecipe
    from lmforge.train.trainer import train

    console = Console(quiet=True)
    run = load_recipe(SpeedrunRecipe, Path(__file__).resolve().parents[1] / "src/lmforge/recipes/cpu-tiny.yaml",
                      [f"run.root={root}", f"run.max_documents={documents}"])
    data = Path(run_stages(run, console, STAGES[:4]).dir) / "data"
    tok = load_tokenizer(data.parent / "tokenizer")
    val = TokenShards(data, "val")
    common = ["model.preset=tiny", f"train.data={data}", "train.seq_len=256", f"train.micro_batch={batch_tokens // 256}",
              f"train.global_batch_tokens={batch_tokens}", f"train.max_steps={steps}", "train.lr=0.003", "train.optimizer=adamw",
              f"train.eval_every={steps}", f"train.ckpt_every={steps}", "train.log_every=10", "train.tensorboard=false"]
    out = {"steps": steps, "batch_tokens": batch_tokens, "documents": documents, "train_tokens": len(TokenShards(data, "train")),
           "val_tokens": min(len(val), 65536)}
    for name in ("plain", "dp"):
        t = time.perf_counter()
        if name == "plain":
            summary = train(load_recipe(TrainRecipe, None, common + [f"train.out={root}/plain"]), console=console)
        else:
            summary = dp_train(load_recipe(TrainRecipe, None, common + [
                f"train.out={root}/dp", "train.dp.enabled=true", f"train.dp.target_epsilon={target_eps}",
                "train.dp.max_grad_norm=1.0"]), console=console)
            out.update({k: summary[k] for k in ("dp_epsilon", "dp_delta", "dp_noise_multiplier", "dp_sample_rate")})
        model = load(summary["model_dir"])
        bpb = bits_per_byte(model, val.slice(0, out["val_tokens"]), tok.token_byte_lengths(), seq_len=256, batch_size=16)
        out[name] = {"bpb": bpb["bpb"], "seconds": time.perf_counter() - t, "final_loss": summary["final_loss"]}
        print(f"{name}: held-out bpb {bpb['bpb']:.4f} after {steps} steps ({out[name]['seconds']:.0f} s)", flush=True)
    out["bpb_cost"] = out["dp"]["bpb"] - out["plain"]["bpb"]
    print(f"tiny preset, {steps} steps: plain {out['plain']['bpb']:.4f} bpb, DP-SGD eps={out['dp_epsilon']:.3f} "
          f"(sigma {out['dp_noise_multiplier']:.3f}, q {out['dp_sample_rate']:.4g}) {out['dp']['bpb']:.4f} bpb; "
          f"cost +{out['bpb_cost']:.4f} bpb")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--skip-canary", action="store_true")
    ap.add_argument("--parts", default="timing,canary", help="comma-separated: timing, canary, tiny")
    ap.add_argument("--tiny-steps", type=int, default=60)
    ap.add_argument("--tiny-epsilon", type=float, default=1.0)
    ap.add_argument("--tiny-documents", type=int, default=2000)
    ap.add_argument("--tiny-batch-tokens", type=int, default=8192, help="tokens per step (the speedrun's 8192)")
    ap.add_argument("--tiny-root", default=None, help="folder for the tiny runs (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    parts = args.parts.split(",")
    results = {}
    if "tiny" in parts:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            results["tiny"] = tiny_bpb(args.tiny_steps, args.tiny_epsilon, args.tiny_documents, args.tiny_root or tmp,
                                     args.tiny_batch_tokens)
    if "timing" not in parts:
        write_json(args.json, "dp_sgd", vars(args), {}, results)
        return
    timing = step_time(args.batch, args.repeat)
    print(f"step (per-example grads + clip, batch {args.batch}): ours {fmt(timing['ours_s'], 1e3, 1, ' ms')}, "
          f"opacus {fmt(timing['opacus_s'], 1e3, 1, ' ms')}; opacus/ours {fmt(timing['ratio_opacus_over_ours'])}; "
          f"clipped sums agree to {timing['max_abs_diff_clipped_sum']:.1e}", flush=True)
    canary = {} if args.skip_canary or "canary" not in parts else canary_run(args.steps, args.epsilon, args.batch, args.clip)
    if canary:
        print(f"canary: plain {canary['exposure_plain']:.2f} bits, DP-SGD (eps={canary['epsilon']:.2f}, "
              f"sigma={canary['sigma']:.3f}, q={canary['q']:.4f}) {canary['exposure_dp']:.2f} bits")
    write_json(args.json, "dp_sgd", vars(args), {}, {**results, "timing": timing, "canary": canary})


if __name__ == "__main__":
    main()
