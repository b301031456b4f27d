"""Run under torchrun (4 ranks) by test_ring_attention.py, not a test itself: ring attention over
the whole world (cp=4) and over two pairs (cp=2), zigzag and contiguous, causal and not, in fp64;
each rank writes the largest difference from full attention on the unsplit sequence.

usage: ring_worker.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.model.attention import naive_attention
from lmforge.model.ring_attention import ring_attention, shard_positions, shard_sequence

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
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(results))
dist.destroy_process_group()
