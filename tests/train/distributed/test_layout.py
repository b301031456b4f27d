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
    (3, {"pp": 3}, "parallel.microbatches=2 is fewer than the parallel.pp=3 pipeline stages"),
    (2, {"pp": 2, "microbatches": 1}, "parallel.microbatches=1 is fewer than the parallel.pp=2 pipeline stages"),
    (2, {"pp": 2, "microbatches": 3}, "do not split into parallel.microbatches=3 equal"),
    (2, {"pp": 2, "pp_schedule": "interleaved_1f1b"}, "must divide the model's n_layers=2 into 4 equal stages"),
    (4, {"pp": 2, "microbatches": 2, "dp_shard": 2}, "not combined with dp_shard, tp or cp"),
    (2, {"microbatches": 4}, "it needs parallel.pp > 1"),
    (3, {"cp": 3}, "seq_len=16 must be a multiple of 2*parallel.cp=6"),
    (1, {"dp_shard": 2}, "must equal the world size 1"),
    (1, {"cpu_offload": True}, "parallel.cpu_offload moves FSDP shards to host memory"),
    (2, {"tp": 2, "cpu_offload": True}, "parallel.cpu_offload moves FSDP shards to host memory"),
])
def test_bad_layouts_are_clear_errors(world, degrees, message):
    with pytest.raises(LmforgeError, match=message.replace("*", r"\*").replace("(", r"\(")):
        layout(world, TC, **degrees)


def test_layouts_the_training_loop_runs():
    grid = layout(4, tp=2)
    assert (grid.dp_shard, grid.tp) == (2, 2) and grid.mesh_shape == (("dp_shard", 2), ("tp", 2))
    assert layout(2, pp=2).mesh_shape == (("pp", 2),)
    untied4 = ModelConfig(**{**CFG.to_dict(), "n_layers": 4})
    assert resolve_layout(ParallelConfig(pp=2, pp_schedule="interleaved_1f1b"), 2, TC, untied4).pp == 2
    with pytest.raises(LmforgeError, match="untied embeddings"):
        resolve_layout(ParallelConfig(pp=2), 2, TC, ModelConfig(**{**CFG.to_dict(), "tie_embeddings": True}))


def test_bad_degree_values_are_refused_when_the_recipe_is_read():
    for bad in ("parallel.tp=0", "parallel.dp_shard=-2", "parallel.param_dtype=int8", "parallel.backend=mpi",
                "parallel.pp_schedule=zb", "parallel.microbatches=-1"):
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


def test_sequence_parallel_needs_seq_len_divisible_by_tp():
    with pytest.raises(LmforgeError, match="seq_len=15 must be a multiple of parallel.tp=2"):
        layout(2, TrainConfig(seq_len=15, micro_batch=4, global_batch_tokens=120), tp=2)
