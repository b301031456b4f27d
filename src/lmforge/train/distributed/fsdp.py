"""FSDP2 (per-parameter sharding, `fully_shard`) applied to a plain Transformer from outside."""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def apply_fsdp(model, mesh: DeviceMesh, reshard_after_forward: bool = True, param_dtype: str = "auto",
               reduce_dtype: str = "auto", cpu_offload: bool = False):
    """Shard every block as its own unit (its weights are gathered just before its forward and,
    with reshard_after_forward, freed just after), then the root (embeddings, final norm, head).
    The head stays in the root unit: the fused loss reads lm_head.weight without calling lm_head,
    so it must be gathered by the root's own forward. Gradients are averaged over the mesh.
    cpu_offload keeps the sharded weights, gradients and optimizer step in host memory (pinned on
    CUDA) and copies each unit's shard to the device just for its all-gather."""
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy,
                    offload_policy=offload)
    # The root's weights are needed again at once by the backward: never reshard them early.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy, offload_policy=offload)
    return model
