"""Impossible parallel settings are one-line errors raised before any process group exists."""
import pytest
import torch.distributed as dist

from lmforge.config import load_recipe
from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.train.config import ParallelConfig, TrainConfig, TrainRecipe
from lmforge.train.distributed.layout import resolve_layout
from lmforge.train.trainer import train

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
TC = TrainConfig(seq_len=16, micro_batch=4, global_batch_tokens=128)  # grad_accum 2


def layout(world, tc=TC, **degrees):
    return resolve_layout(ParallelConfig(**degrees), world, tc, CFG)


def test_dp_shard_fills_the_world_and_mesh_names_its_dimensions():
    assert layout(4).dp_shard == 4 and layout(4).mesh_shape == (("dp_shard", 4),)
    assert layout(2, dp_shard=2).dp_shard == 2
    assert layout(1).mesh_shape == (("dp_shard", 1),)


@pytest.mark.parametrize("world,degrees,message", [
    (4, {"tp": 3}, "does not divide the world size 4"),
    (4, {"dp_shard": 3}, "must equal the world size 4"),
    (8, {"dp_shard": 8}, "micro_batch=4 must be a multiple of parallel.dp_shard=8"),
    (6, {"tp": 3, "dp_shard": 2}, "parallel.tp=3 must divide the model's n_heads=4"),
    (4, {"pp": 4}, "parallel.pp=4 must divide the model's n_layers=2"),
    (4, {"pp": 2, "dp_shard": 2}, "need at least as many micro-batches"),
    (3, {"cp": 3}, "seq_len=16 must be a multiple of 2*parallel.cp=6"),
    (4, {"tp": 2}, "tp=2 is not available in the training loop yet"),
    (1, {"dp_shard": 2}, "must equal the world size 1"),
])
def test_bad_layouts_are_clear_errors(world, degrees, message):
    tc = TC if "pp" not in degrees or degrees.get("dp_shard") != 2 else TrainConfig(seq_len=16, micro_batch=4,
                                                                                     global_batch_tokens=64)
    with pytest.raises(LmforgeError, match=message.replace("*", r"\*").replace("(", r"\(")):
        layout(world, tc, **degrees)


def test_bad_degree_values_are_refused_when_the_recipe_is_read():
    for bad in ("parallel.tp=0", "parallel.dp_shard=-2", "parallel.param_dtype=int8", "parallel.backend=mpi"):
        with pytest.raises(LmforgeError, match="parallel."):
            load_recipe(TrainRecipe, None, [bad])


def test_train_refuses_before_creating_a_process_group(toy_shards, tmp_path, monkeypatch):
    """As a torchrun worker of a 4-process world would: the error comes first, nothing is started."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    recipe = load_recipe(TrainRecipe, None, ["model.preset=tiny", "model.n_heads=4", "model.n_kv_heads=2",
                                             "model.dim=32", f"train.data={toy_shards}", f"train.out={tmp_path}/o",
                                             "train.seq_len=16", "train.micro_batch=4",
                                             "train.global_batch_tokens=128", "parallel.tp=3"])
    with pytest.raises(LmforgeError, match="does not divide the world size 4"):
        train(recipe)
    assert not dist.is_initialized() and not (tmp_path / "o").exists()
