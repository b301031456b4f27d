"""parallel.cp layouts: the mesh the training loop builds, and the settings it refuses with one
line before any process group exists."""
import pytest

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.train.config import ParallelConfig, TrainConfig
from lmforge.train.distributed.layout import resolve_layout

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
TC = dict(seq_len=16, micro_batch=4, global_batch_tokens=128)


def layout(world, cfg=CFG, **train):
    degrees = {k: train.pop(k) for k in ("cp", "tp", "pp", "dp_shard") if k in train}
    return resolve_layout(ParallelConfig(**degrees), world, TrainConfig(**{**TC, **train}), cfg)


def test_cp_meshes():
    assert layout(2, cp=2).mesh_shape == (("cp", 2),)
    grid = layout(4, cp=2)
    assert (grid.dp_shard, grid.cp) == (2, 2) and grid.mesh_shape == (("dp_shard", 2), ("cp", 2))
    assert layout(4, cp=4).mesh_shape == (("cp", 4),)  # 16 = 2 chunks x 4 ranks x 2 positions


@pytest.mark.parametrize("world,settings,message", [
    (2, {"cp": 2, "seq_len": 18, "global_batch_tokens": 144}, r"seq_len=18 must be a multiple of 2\*parallel.cp=4"),
    (4, {"cp": 2, "tp": 2}, "parallel.cp is not combined with parallel.tp"),
    (2, {"cp": 2, "activation_checkpointing": True}, "activation_checkpointing is not supported with parallel.cp"),
    (2, {"cp": 2, "compile": True}, "compile is not supported with parallel.cp"),
    (4, {"cp": 2, "pp": 2}, "not combined with dp_shard, tp or cp"),
])
def test_bad_cp_settings_are_clear_errors(world, settings, message):
    with pytest.raises(LmforgeError, match=message):
        layout(world, **settings)


def test_cp_needs_a_dense_model():
    moe = ModelConfig(**{**CFG.to_dict(), "n_experts": 2, "n_experts_per_token": 1})
    with pytest.raises(LmforgeError, match="dense model"):
        layout(2, moe, cp=2)
