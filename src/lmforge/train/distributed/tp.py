"""Tensor parallel + sequence parallel (Megatron style) on a plain Transformer, through DTensor's
`parallelize_module`: in every block q/k/v and gate/up are split by output columns (whole heads,
whole hidden units per rank), o_proj and down_proj by input rows; the norms and residual adds run on
a 1/tp slice of the sequence (sequence parallel), gathered before attention/MLP and scattered after.
Embeddings, final norm and head stay replicated (the fused loss reads lm_head.weight directly)."""
from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from lmforge.errors import LmforgeError

# Block.forward / Attention.forward positional arguments: x, cos, sin, cache, layer, mask
_REST = (None,) * 5


def apply_tp(model, mesh: DeviceMesh):
    tp = mesh.size()
    cfg = model.cfg
    if cfg.n_heads % tp or cfg.n_kv_heads % tp or cfg.n_experts:
        raise LmforgeError(f"tensor parallel {tp} needs a dense model whose n_heads and n_kv_heads it divides")
    gather, scatter = (Shard(1), *_REST), (Replicate(), *_REST)
    for block in model.layers:
        parallelize_module(block, mesh, {
            "": PrepareModuleInput(input_layouts=scatter, desired_input_layouts=gather, use_local_output=True),
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_layouts=gather, desired_input_layouts=scatter),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
        parallelize_module(block, mesh, PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(),
                                                              use_local_output=True))
        block.self_attn.n_heads //= tp  # each rank computes its own whole heads
        block.self_attn.n_kv_heads //= tp
    return model
