"""Run under torchrun by test_dcp_resharding.py (not a test itself): load a DCP checkpoint into
this world's layout, write it straight back out as a new checkpoint (so the test can compare what
this layout loaded, bit for bit), then resume training from the original checkpoint.

usage: reshard_worker.py CKPT_STEP_DIR RESAVE_ROOT override...
"""
import sys
from pathlib import Path

from rich.console import Console

from lmforge.config import load_recipe
from lmforge.train.config import TrainRecipe
from lmforge.train.distributed.checkpoint import save_dcp_checkpoint
from lmforge.train.distributed.runtime import start_runtime
from lmforge.train.objective import PretrainObjective
from lmforge.train.trainer import build_optimizer, initial_model, train

step_dir, resave_root, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
recipe = load_recipe(TrainRecipe, None, overrides)
tc = recipe.train
vocab = PretrainObjective(tc.data, tc.seq_len, tc.eval_tokens, tc.micro_batch).vocab_size
cfg = recipe.model_config(vocab_size=vocab)
rt = start_runtime(recipe.parallel, tc, cfg, Console())
model = rt.parallelize(initial_model(tc, cfg, vocab, rt.device))
optimizer = build_optimizer(model, tc, rt.device)
state = rt.load_checkpoint(step_dir, model, optimizer)
save_dcp_checkpoint(resave_root, state.pop("step"), model, optimizer, state, keep_last=1)
train(recipe, resume=True)  # reuses this process group and closes it at the end
