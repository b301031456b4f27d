"""Run under torchrun by tests/train/distributed/test_plan_fsdp_memory.py (not a test itself): train a
tiny fp32 Llama for two AdamW steps under FSDP2 (reshard after forward on, then off) and write
what this rank holds and sends:
- the bytes of its local parameter, gradient and optimizer-state shards (read from the tensors);
- peak tracked bytes by PyTorch's own FSDPMemTracker (every tensor allocation, by category);
- the bytes through all_gather / reduce_scatter / all_reduce in one step (the calls wrapped);
then under tensor parallelism (apply_tp over the same ranks) the bytes of its local parameter,
gradient and optimizer-state shards.

usage: fsdp_memory_worker.py OUT_DIR BATCH SEQ_LEN
"""
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.device_mesh import init_device_mesh

from lmforge.model import ModelConfig, Transformer
from lmforge.train.distributed.fsdp import apply_fsdp
from lmforge.train.distributed.tp import apply_tp

CFG = ModelConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352, max_seq_len=128)
out, batch, seq_len = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
sent: Counter = Counter()


def counted(name, fn, tensor_arg, position):
    def wrapper(*args, **kwargs):
        t = kwargs[tensor_arg] if tensor_arg in kwargs else args[position]
        sent[name] += t.numel() * t.element_size()
        return fn(*args, **kwargs)
    return wrapper


# FSDP2 calls these through the torch.distributed module: the full (gathered / pre-reduction) size
dist.all_gather_single = counted("all_gather", dist.all_gather_single, "output", 0)
dist.reduce_scatter_single = counted("reduce_scatter", dist.reduce_scatter_single, "input", 1)
dist.all_reduce = counted("all_reduce", dist.all_reduce, "tensor", 0)


def nbytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


results = {"config": CFG.to_dict()}
for reshard in (True, False):
    torch.manual_seed(0)
    model = apply_fsdp(Transformer(CFG), mesh, reshard_after_forward=reshard)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, CFG.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(rank))
    def step():
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        optimizer.step()

    step()  # allocates the optimizer state; the measured step runs with it in place
    grads = nbytes(p.grad for p in model.parameters())
    optimizer.zero_grad(set_to_none=True)
    sent.clear()
    tracker = FSDPMemTracker(model, optimizer)
    tracker.track_inputs((tokens,))
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    results["reshard" if reshard else "no_reshard"] = {
        "weights": nbytes(model.parameters()), "gradients": grads,
        "optimizer": nbytes(v for s in optimizer.state.values() for v in s.values() if v.dim() > 0),
        "peak": peak, "comm": dict(sent)}

# Tensor parallel (apply_tp, the whole world as the tp dimension): the bytes each rank holds.
torch.manual_seed(0)
model = apply_tp(Transformer(CFG), init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
optimizer.step()
results["tp"] = {"weights": nbytes(model.parameters()), "gradients": nbytes(p.grad for p in model.parameters()),
                 "optimizer": nbytes(v for s in optimizer.state.values() for v in s.values() if v.dim() > 0)}
(out / f"rank{rank}.json").write_text(json.dumps(results))
dist.destroy_process_group()
