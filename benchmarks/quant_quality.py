"""Quality of weight quantisation: held-out perplexity of SmolLM2-135M-Instruct after each method,
against float32, on text that no method calibrated on.

    python benchmarks/quant_quality.py                  # int8, smoothquant, rtn, awq, gptq (g128, asym), nf4
    python benchmarks/quant_quality.py --eval-tokens 4096 --json quant_quality.json
    python benchmarks/quant_quality.py --methods gguf-q4_0,gguf-q4_k   # our GGUF exports, loaded back
    python benchmarks/quant_quality.py --methods rtn --sym --group-size 32 --head-bits 4 --decode-path
    LMFORGE_INT4_KERNEL=torch python benchmarks/quant_quality.py ... --decode-path   # PyTorch's int4 kernel

Calibration: 16 x 256 tokens of the stdlib *train* split (lmforge.quant.calibration); evaluation:
the stdlib *val* split (lmforge.serve.perplexity.heldout_text), scored in windows of 512 tokens.
The bundled model is a Q4_1 GGUF dequantised to float32: "fp32" is that float model, and every
method re-quantises it. "gap recovered" = (ppl_rtn - ppl_method) / (ppl_rtn - ppl_fp32).
gguf-TYPE: `lmforge export gguf --type TYPE` of the float model, loaded back (weights MB = the file).
--decode-path: score in 256-token windows, one per forward, so that quantised layers run the CPU
kernels that serving uses (int4: lmforge's int4 x int8 kernel or, with LMFORGE_INT4_KERNEL=torch,
PyTorch's) rather than the dequantised float weights that long scoring batches take; the kernels'
own approximations (int8 or bf16 activations) then show in the perplexity.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from common import write_json
from lmforge.gguf_file import bundled_smollm2
from lmforge.model import load
from lmforge.model.scoring import score_tokens
from lmforge.quant import quantize_model
from lmforge.quant.calibration import calibration_batch
from lmforge.quant.gguf_export import TYPES as GGUF_TYPES
from lmforge.quant.gguf_export import export_gguf
from lmforge.quant.int8 import weight_bytes
from lmforge.serve.perplexity import heldout_text, perplexity
from lmforge.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action="store_true", help="symmetric grids for rtn/awq/gptq (default: asymmetric)")
    ap.add_argument("--methods", default="int8,smoothquant,rtn,awq,gptq,nf4")
    ap.add_argument("--head-bits", type=int, default=8, help="LM head of rtn/awq/gptq: 8 (int8) or 4 (the body's grid)")
    ap.add_argument("--decode-path", action="store_true", help="256-token windows one per forward: the serving kernels")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    known = ["int8", "smoothquant", "rtn", "awq", "gptq", "nf4"] + [f"gguf-{kind}" for kind in GGUF_TYPES]
    unknown = [m for m in args.methods.split(",") if m not in known]
    if unknown:   # before minutes of quantising the others
        ap.error(f"unknown --methods {', '.join(unknown)} (known: {', '.join(known)})")
    torch.manual_seed(0)
    path = bundled_smollm2()
    tok, base = load_tokenizer(path), load(path)
    ids = tok.encode(heldout_text(args.eval_tokens * 6))[:args.eval_tokens]
    calib = calibration_batch(tok, 16, 256)
    grid = {"group_size": args.group_size, "asym": not args.sym, "head_bits": args.head_bits}
    settings = {"int8": {}, "smoothquant": {}, "nf4": {}, "rtn": grid, "awq": grid, "gptq": {**grid, "act_order": True}}
    def score(model) -> float:
        if args.decode_path:
            return score_tokens(model, ids, window=256, batch_size=1).perplexity
        return perplexity(model, ids)
    rows = {"fp32": {"ppl": score(base), "mb": weight_bytes(base) / 2**20, "quantise_s": 0.0}}
    print(f"fp32  ppl {rows['fp32']['ppl']:.3f}", flush=True)
    for method in args.methods.split(","):
        start = time.perf_counter()
        if method.startswith("gguf-"):
            with tempfile.TemporaryDirectory() as tmp:
                file = export_gguf(base, tok, Path(tmp) / "model.gguf", method.removeprefix("gguf-"))
                model, mb = load(file), file.stat().st_size / 2**20
        else:
            model = copy.deepcopy(base)
            quantize_model(model, method, calibration=calib, **settings[method])
            mb = weight_bytes(model) / 2**20
        seconds = time.perf_counter() - start
        rows[method] = {"ppl": score(model), "mb": mb, "quantise_s": seconds}
        print(f"{method:5s} ppl {rows[method]['ppl']:.3f}  ({seconds:.0f} s to quantise)", flush=True)
        del model
    fp = rows["fp32"]["ppl"]
    gap = rows["rtn"]["ppl"] - fp if "rtn" in rows else None
    path = " (decode path: 256-token windows)" if args.decode_path else ""
    print(f"\n{len(ids)} held-out tokens{path}; 4-bit grids g{args.group_size} {'sym' if args.sym else 'asym'}, "
          f"LM head {'int8' if args.head_bits == 8 else 'on the 4-bit grid'}")
    print("| method | perplexity | vs fp32 | weights MB | RTN gap recovered | quantise s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        recovered = (f"{(rows['rtn']['ppl'] - r['ppl']) / gap:.0%}" if gap and name in ("awq", "gptq") else "")
        print(f"| {name} | {r['ppl']:.3f} | {r['ppl'] / fp - 1:+.2%} | {r['mb']:.0f} | {recovered} | {r['quantise_s']:.0f} |")
    if args.json:
        write_json(args.json, "quant_quality", vars(args), {"tokens": len(ids)}, rows)


if __name__ == "__main__":
    main()
