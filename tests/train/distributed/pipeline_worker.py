"""Run under torchrun (2 ranks) by test_pipeline.py, not a test itself: for each pipeline schedule
(GPipe, 1F1B, interleaved 1F1B with 2 stages per rank) split a tiny fp64 Transformer with apply_pp,
run one step over a batch of 8 rows in 4 micro-batches, and write the largest differences from the
unsplit model's loss and gradients on the same batch (computed by every rank for itself).

usage: pipeline_worker.py OUT_DIR
"""
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.model import ModelConfig, Transformer
from lmforge.train.distributed.pipeline import SCHEDULES, apply_pp

dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
torch.manual_seed(0)
plain = Transformer(cfg).double()
tokens = torch.randint(0, 64, (8, 13), generator=torch.Generator().manual_seed(1))
ref_loss = plain(tokens[:, :-1], targets=tokens[:, 1:])  # the mean over all 8 x 12 targets
ref_loss.backward()
ref = {n: p.grad for n, p in plain.named_parameters()}
results = {}
for schedule in SCHEDULES:
    model = copy.deepcopy(plain)
    model.zero_grad(set_to_none=True)
    part, pipe = apply_pp(model, rank, 2, schedule, 4, torch.device("cpu"))
    loss = pipe.step(tokens)
    names = [n for n, _ in part.named_parameters()]
    results[schedule] = {
        "loss": abs(float(loss) - float(ref_loss)) if loss is not None else None,
        "grad": max(float((p.grad - ref[n]).abs().max()) for n, p in part.named_parameters()),
        "names": names,
    }
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(results))
dist.destroy_process_group()
