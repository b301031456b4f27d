"""Run under torchrun by test_dcp_resharding.py (not a test itself): for each of this world's
layouts (FSDP over both ranks, then tensor parallel over both), load a DCP checkpoint into that
layout, write it straight back out as a new checkpoint (so the test can compare what the layout
loaded, bit for bit), then resume training from the original checkpoint in WORK_ROOT/<layout>.
One launch serves both layouts: the process group is kept open between them.

usage: reshard_worker.py CKPT_STEP_DIR WORK_ROOT override...
"""
import json
import sys
from pathlib import Path

import torch.distributed as dist
from rich.console import Console

from lmforge.config import load_recipe
from lmforge.train.config import TrainRecipe
from lmforge.train.distributed.checkpoint import save_dcp_checkpoint
from lmforge.train.distributed.runtime import Distributed, start_runtime
from lmforge.train.objective import PretrainObjective
from lmforge.train.trainer import build_optimizer, initial_model, train

LAYOUTS = {"two": ["parallel.dp_shard=2"], "tp": ["parallel.tp=2", "parallel.dp_shard=1"]}

step_dir, work_root, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
Distributed.close = lambda self: None  # train() would end the process group; the next layout reuses it
for name, layout in LAYOUTS.items():
    recipe = load_recipe(TrainRecipe, None, [*overrides, *layout, f"train.out={work_root / name}"])
    tc = recipe.train
    vocab = PretrainObjective(tc.data, tc.seq_len, tc.eval_tokens, tc.micro_batch).vocab_size
    cfg = recipe.model_config(vocab_size=vocab)
    rt = start_runtime(recipe.parallel, tc, cfg, Console())
    model = rt.parallelize(initial_model(tc, cfg, vocab, rt.device))
    optimizer = build_optimizer(model, tc, rt.device)
    q = model.layers[0].self_attn.q_proj.weight  # a DTensor in both layouts: record which mesh and split
    if rt.main:
        (work_root / f"layout_{name}.json").write_text(json.dumps(
            {"mesh": q.device_mesh.mesh_dim_names, "placements": [repr(p) for p in q.placements]}))
    state = rt.load_checkpoint(step_dir, model, optimizer)
    save_dcp_checkpoint(work_root / f"resaved_{name}", state.pop("step"), model, optimizer, state, keep_last=1)
    train(recipe, resume=True)
dist.destroy_process_group()
