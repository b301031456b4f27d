"""`lmforge scaling sweep`: train a grid of tiny models (sizes x token budgets) on CPU with the
pretraining loop, record (N, D, loss) per run, and fit L(N, D) to them.

With no data given, the sweep tokenises a slice of the standard library at the byte level
(vocabulary 256 + end-of-text), which needs no tokenizer training. N is the non-embedding
parameter count: at these sizes the embedding is a large, loss-irrelevant share of the total
(Kaplan et al. 2020). Finished runs are read back from their summary.json, so a sweep resumes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from lmforge.errors import LmforgeError
from lmforge.plan.runs import write_runs

BYTE_VOCAB, BYTE_EOS = 257, 256


@dataclass
class SweepConfig:
    out: str = "runs/scaling-sweep"
    data: str = ""                        # token shard directory; "" builds byte-level stdlib shards
    dims: tuple[int, ...] = (32, 48, 64, 96)
    steps: tuple[int, ...] = (50, 100, 200)
    n_layers: int = 2
    seq_len: int = 64
    micro_batch: int = 8
    lr: float = 3e-3
    seed: int = 0
    stdlib_files: int = 200               # how many stdlib files the default data uses


def byte_shards(out: Path, files: int) -> Path:
    """Byte-level token shards of the first `files` stdlib sources (train/val by path hash)."""
    from lmforge.data.shards import ShardWriter
    from lmforge.corpus.stdlib import stdlib_documents
    if (out / "index.json").exists():
        return out
    writer = ShardWriter(out, BYTE_VOCAB, BYTE_EOS, meta={"tokenizer": "bytes"})
    for doc in stdlib_documents(limit=files):
        writer.add(doc.meta["split"], doc.text.encode("utf-8"))
    writer.close()
    return out


def model_spec(dim: int, cfg: SweepConfig) -> dict:
    return dict(dim=dim, n_layers=cfg.n_layers, n_heads=max(1, dim // 16), multiple_of=16,
                max_seq_len=cfg.seq_len, tie_embeddings=True)


def run_one(name: str, dim: int, steps: int, data: str, cfg: SweepConfig, console: Console) -> dict:
    from lmforge.train.config import TrainConfig, TrainRecipe
    from lmforge.train.trainer import train
    run_dir = Path(cfg.out) / "runs" / name
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    tc = TrainConfig(data=data, out=str(run_dir), seq_len=cfg.seq_len, micro_batch=cfg.micro_batch,
                     global_batch_tokens=cfg.micro_batch * cfg.seq_len, max_steps=steps, lr=cfg.lr,
                     eval_every=steps, eval_tokens=16384, ckpt_every=steps, keep_last=1, log_every=steps,
                     seed=cfg.seed, device="cpu", tensorboard=False)
    recipe = TrainRecipe(model=model_spec(dim, cfg), train=tc)
    result = train(recipe, resume=True, console=Console(quiet=True))
    model_cfg = recipe.model_config(vocab_size=_vocab(data))
    n = model_cfg.num_params(embeddings=False) - (0 if model_cfg.tie_embeddings else
                                                   model_cfg.vocab_size * model_cfg.dim)
    loss = result.get("val_loss") if result.get("val_loss") is not None else result.get("final_loss")
    if loss is None:
        raise LmforgeError(f"run {name} finished without a loss")
    row = {"name": name, "N": n, "D": result["tokens_seen"], "C": 6 * n * result["tokens_seen"], "loss": loss,
           "params_total": result["params"], "dim": dim, "steps": steps}
    summary_path.write_text(json.dumps(row))
    return row


def _vocab(data: str) -> int:
    from lmforge.data.shards import read_index
    return read_index(data)["vocab_size"]


def run_sweep(cfg: SweepConfig, console: Console | None = None) -> tuple[list[dict], Path]:
    """Train every (dim, steps) pair; returns the rows and the path of the runs.csv written."""
    console = console or Console()
    if not cfg.dims or not cfg.steps or min(cfg.dims) < 16 or min(cfg.steps) < 1:
        raise LmforgeError("a sweep needs model widths of at least 16 and positive step counts")
    if len(cfg.dims) * len(cfg.steps) < 5:
        raise LmforgeError("fitting L(N, D) needs at least 5 runs: give more --dims or --steps")
    import torch
    out = Path(cfg.out)
    data = cfg.data or str(byte_shards(out / "data", cfg.stdlib_files))
    rows = []
    # Matrices this small gain nothing from intra-op threads, and on a busy machine the threads'
    # synchronisation makes each step >10x slower; the setting is restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dim in cfg.dims:
            for steps in cfg.steps:
                name = f"d{dim}-s{steps}"
                row = run_one(name, dim, steps, data, cfg, console)
                console.print(f"{name}: N={row['N']:,} D={row['D']:,} loss {row['loss']:.4f}", highlight=False)
                rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows, write_runs(out / "runs.csv", rows)
