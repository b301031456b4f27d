"""Training checkpoints: model (safetensors), optimizer + RNG (torch.save, read back with
weights_only=True) and trainer state (JSON), written to a temp dir, fsynced and renamed into place.

Layout: OUT/ckpt/step_000100/{lmforge_model.json, model.safetensors, optim.pt, trainer.json}.
Only directories named step_* count; a crash mid-write leaves a hidden temp dir that is ignored
and cleaned up, so the previous checkpoint stays the latest.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.model.io import load as load_model
from lmforge.model.io import write_model_files

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def list_checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "trainer.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


# Test hook: seconds to sleep between the files of a checkpoint, so a test can SIGKILL the
# trainer while a checkpoint is half written (tests/train/test_resume.py). Unset in normal use.
PAUSE_ENV = "LMFORGE_TEST_CKPT_WRITE_PAUSE_S"


def save_checkpoint(root: Path, step: int, model, optimizer, trainer_state: dict, keep_last: int) -> Path:
    """Write every file into a hidden temp dir, fsync the files and the dir, rename it to step_N and
    fsync the parent, so after a crash or power loss step_N is either absent or complete."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    write_model_files(model, tmp)
    _pause_for_tests()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "optim.pt")
    _pause_for_tests()
    (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    final = root / f"step_{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _pause_for_tests() -> None:
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        time.sleep(float(pause))


def _fsync(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model weights, optimizer and RNG state in place; return the trainer state."""
    try:
        state = json.loads((path / "trainer.json").read_text())
        saved = load_model(path)
        blob = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, pickle.UnpicklingError, RuntimeError) as e:
        raise LmforgeError(f"{path}: corrupt checkpoint ({e})") from e
    if saved.cfg != model.cfg:
        raise LmforgeError(f"{path}: checkpoint model config differs from the recipe's")
    model.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"]["cpu"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return state
