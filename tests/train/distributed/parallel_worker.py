"""Run under torchrun (4 ranks) by test_ring_attention.py and test_tensor_parallel.py (one launch
for both), not a test itself; each rank writes the largest differences from the unsplit reference:
- ring attention over the whole world (cp=4) and over two pairs (cp=2), zigzag and contiguous,
  causal and not, in fp64, against full attention on the unsplit sequence;
- tensor + sequence parallel (apply_tp) on the tp dimension of a 2x2 mesh, and FSDP x TP on the
  whole 2x2 mesh, against the same plain model: loss and every parameter's gradient, fp64.

usage: parallel_worker.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from lmforge.model import ModelConfig, Transformer
from lmforge.model.attention import naive_attention
from lmforge.model.ring_attention import ring_attention, shard_positions, shard_sequence
from lmforge.train.distributed.fsdp import apply_fsdp
from lmforge.train.distributed.tp import apply_tp

dist.init_process_group("gloo")
rank = dist.get_rank()
pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
B, H, HKV, T, D, BLOCK = 2, 4, 2, 24, 8, 5  # BLOCK does not divide a rank's chunk: ragged blocks
results = {}
for cp, group in ((4, dist.group.WORLD), (2, pairs[rank // 2])):
    me = dist.get_rank(group)
    for zigzag in (True, False):
        for causal in (True, False):
            g = torch.Generator().manual_seed(cp * 10 + causal)  # same full inputs on every rank
            q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
            k, v = (torch.randn(B, HKV, T, D, generator=g, dtype=torch.float64) for _ in range(2))
            dout = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            ref_out, ref_lse = naive_attention(*full, causal)
            ref_out.backward(dout)
            local = [shard_sequence(t, me, cp, zigzag=zigzag).requires_grad_() for t in (q, k, v)]
            pos = shard_positions(T, me, cp, zigzag)
            out, lse = ring_attention(*local, pos, pos, group, causal, BLOCK)
            out.backward(shard_sequence(dout, me, cp, zigzag=zigzag))

            def diff(a, ref):
                return float((a - shard_sequence(ref, me, cp, zigzag=zigzag)).abs().max())
            results[f"cp{cp}-{'zigzag' if zigzag else 'contiguous'}-{'causal' if causal else 'full'}"] = {
                "out": diff(out, ref_out), "lse": diff(lse[..., None], ref_lse[..., None]),
                "dq": diff(local[0].grad, full[0].grad), "dk": diff(local[1].grad, full[1].grad),
                "dv": diff(local[2].grad, full[2].grad)}


CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
MESH = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


def tensor_parallel_diffs() -> dict:
    cfg = CFG
    torch.manual_seed(0)
    plain = Transformer(cfg).double()
    torch.manual_seed(0)
    sharded = apply_tp(Transformer(cfg).double(), MESH["tp"])
    seen = {}  # local sequence length each norm runs on: T/2 under sequence parallel
    def record(module, args, out):  # (returns None: the output is left alone)
        seen["norm_rows"] = args[0].to_local().shape[1]
    sharded.layers[0].post_attention_layernorm.register_forward_hook(record)
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (plain, sharded):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        losses.append(float(loss))
    grads = {}
    for (name, p), (_, s) in zip(plain.named_parameters(), sharded.named_parameters()):
        g = s.grad.full_tensor() if isinstance(s.grad, DTensor) else s.grad
        grads[name] = float((p.grad - g).abs().max())
    q = sharded.layers[0].self_attn.q_proj.weight
    return {"loss": abs(losses[0] - losses[1]), "grad": max(grads.values()), "n_grads": len(grads),
            "norm_rows": seen["norm_rows"], "q_rows_local": q.to_local().shape[0], "q_rows": q.shape[0]}


def fsdp_tp_diffs() -> dict:
    """FSDP over dp x TP over tp on the 2x2 mesh, each dp rank on its half of a 4-row batch: the
    dp-mean loss and the (dp-averaged) gradients equal the plain model's on all 4 rows."""
    torch.manual_seed(0)
    plain = Transformer(CFG).double()
    torch.manual_seed(0)
    model = apply_fsdp(apply_tp(Transformer(CFG).double(), MESH["tp"]), MESH["dp"])
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))
    ref = plain(tokens[:, :-1], targets=tokens[:, 1:])
    ref.backward()
    half = tokens.chunk(2)[MESH["dp"].get_local_rank()]
    loss = model(half[:, :-1], targets=half[:, 1:])
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean, group=MESH["dp"].get_group())
    diffs = [float((p.grad - s.grad.full_tensor()).abs().max())
             for (_, p), (_, s) in zip(plain.named_parameters(), model.named_parameters())]
    return {"loss": abs(float(mean) / 2 - float(ref)), "grad": max(diffs), "n_grads": len(diffs),
            "n_2d": sum(s.device_mesh.ndim == 2 for s in model.parameters())}


results["tp2"] = tensor_parallel_diffs()
results["fsdp2xtp2"] = fsdp_tp_diffs()
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(results))
dist.destroy_process_group()
