"""parallel.cpu_offload reaches every FSDP unit (the 2-rank training equality runs with it on:
test_fsdp_training.py)."""
import socket

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy

from lmforge.model import Transformer
from lmforge.model.config import ModelConfig
from lmforge.train.distributed.fsdp import apply_fsdp

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


@pytest.mark.parametrize("offload", [True, False])
def test_cpu_offload_policy_is_set_on_every_unit(one_rank_group, offload):
    model = apply_fsdp(Transformer(CFG), one_rank_group, cpu_offload=offload)
    units = [model, *model.layers]
    policies = [unit._get_fsdp_state()._fsdp_param_group.offload_policy for unit in units]
    assert all(isinstance(p, CPUOffloadPolicy) == offload for p in policies)
