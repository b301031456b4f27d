"""Distributed checkpoints (torch.distributed.checkpoint): each process writes its own shards, the
metadata records the global shapes, so a checkpoint saved at one layout loads at any other (or in
one process with no process group). Beside the shards: the model config, the trainer state
(step, tokens, loader position) and the RNG state, all layout-independent.

Layout: OUT/ckpt/step_000100/{dcp/ (DCP files), lmforge_model.json, rng.pt, trainer.json}; built
in a hidden temp dir and renamed into place by rank 0 once every rank has written, so a kill at any
moment leaves either no step_N or a complete one (train/checkpoint.py has the same rule).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.train.checkpoint import CONFIG_FILE, _pause_for_tests, publish_checkpoint

DCP_DIR = "dcp"


def is_dcp_checkpoint(path: Path) -> bool:
    return (path / DCP_DIR / ".metadata").is_file()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_dcp_checkpoint(root: Path, step: int, model, optimizer, trainer_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it with its shard of the model and optimizer."""
    tmp, final = root / f".tmp-step_{step:06d}", root / f"step_{step:06d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / DCP_DIR)  # fsyncs its files
    _pause_for_tests()
    _barrier()  # every rank's shards are written
    if _rank() == 0:
        (tmp / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2))
        # Every rank was seeded alike and drew alike, so rank 0's RNG stands for all of them.
        torch.save({"cpu": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        publish_checkpoint(tmp, root, step, keep_last)
    _barrier()
    return final


def load_dcp_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore a DCP checkpoint into this process's model and optimizer, whatever layout saved it
    (FSDP at any degree, or one plain process); return the trainer state."""
    try:
        state = json.loads((path / "trainer.json").read_text())
        saved_cfg = json.loads((path / CONFIG_FILE).read_text())
        if not isinstance(saved_cfg, dict):
            raise RuntimeError(f"{CONFIG_FILE} is not a JSON object")
        rng = torch.load(path / "rng.pt", weights_only=True)
    except (OSError, json.JSONDecodeError, RuntimeError) as e:
        raise LmforgeError(f"{path}: corrupt checkpoint ({e})") from e
    if ModelConfig.from_dict(saved_cfg).to_dict() != model.cfg.to_dict():  # (fields added since: defaults)
        raise LmforgeError(f"{path}: checkpoint model config differs from the recipe's")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    target = {"model": model_sd, "optim": optim_sd}
    dcp.load(target, checkpoint_id=path / DCP_DIR)
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    torch.set_rng_state(rng["cpu"])
    return state

