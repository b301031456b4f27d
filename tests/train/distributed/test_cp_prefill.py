"""Context-parallel prefill (context_parallel.prefill_logits): one forward of whole rows split
zigzag over 2 gloo ranks, with ring attention, gives the plain model's logits at every position
(fp64, GQA). Under torchrun this file is the worker; under pytest it launches itself."""
import sys
from pathlib import Path

import torch

MAX_DIFF = 1e-12


def worker(out_dir: str) -> None:
    import torch.distributed as dist

    from lmforge.model import ModelConfig, Transformer
    from lmforge.train.distributed.context_parallel import prefill_logits

    dist.init_process_group("gloo")
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens)
        got = prefill_logits(model, tokens, dist.group.WORLD, block=5)  # ragged blocks of each 6-token chunk
    diff = float((got - ref).abs().max())
    Path(out_dir, f"rank{dist.get_rank()}.txt").write_text(repr(diff))
    dist.destroy_process_group()


def test_cp2_prefill_logits_equal_one_forward(tmp_path):
    from conftest import run_torchrun

    run_torchrun(2, [__file__, str(tmp_path)], tmp_path / "prefill.log", timeout=180)
    diffs = [float((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)]
    assert max(diffs) < MAX_DIFF, diffs


if __name__ == "__main__":
    worker(sys.argv[1])
