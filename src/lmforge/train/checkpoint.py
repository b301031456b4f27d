"""Training checkpoints: model (safetensors), optimizer + RNG (torch.save, read back with
weights_only=True) and trainer state (JSON), written to a temp dir, fsynced and renamed into place.

Layout: OUT/ckpt/step_000100/{lmforge_model.json, model.safetensors, optim.pt, trainer.json}.
A model whose objective froze or extended it (LoRA adapters, a reward head) stores only its
trainable parameters, by name, in trainable.safetensors instead of model.safetensors: the frozen
rest is rebuilt from train.init_from on resume.
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.model.io import load as load_model
from lmforge.model.io import write_model_files

STEP_DIR = re.compile(r"^step_(\d{6,})$")
TRAINABLE_FILE = "trainable.safetensors"
CONFIG_FILE = "lmforge_model.json"


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


def save_checkpoint(root: Path, step: int, model, optimizer, trainer_state: dict, keep_last: int,
                    trainable_only: bool = False) -> Path:
    """Write every file into a hidden temp dir, fsync the files and the dir, rename it to step_N and
    fsync the parent, so after a crash or power loss step_N is either absent or complete."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    if trainable_only:
        (tmp / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2))
        save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad},
                  str(tmp / TRAINABLE_FILE))
    else:
        write_model_files(model, tmp)
    _pause_for_tests()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "optim.pt")
    _pause_for_tests()
    (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    return publish_checkpoint(tmp, root, step, keep_last)


def publish_checkpoint(tmp: Path, root: Path, step: int, keep_last: int) -> Path:
    """fsync tmp's files and tmp, rename it to root/step_N, fsync root, keep the last keep_last."""
    for f in tmp.iterdir():
        if f.is_file():
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


def load_trainable(path: Path, model, saved: dict) -> None:
    """Copy a trainable-only checkpoint into the model, which must train exactly those parameters."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise LmforgeError(f"{path}: the checkpoint's trainable weights differ from the model's "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same "
                           "lora settings and objective")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise LmforgeError(f"{path}: {name} has shape {tuple(saved[name].shape)}, "
                                   f"the model's is {tuple(p.shape)}")
            p.copy_(saved[name])


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model weights, optimizer and RNG state in place; return the trainer state."""
    try:
        state = json.loads((path / "trainer.json").read_text())
        partial = (path / TRAINABLE_FILE).is_file()
        saved = load_file(str(path / TRAINABLE_FILE)) if partial else load_model(path)
        saved_cfg = json.loads((path / CONFIG_FILE).read_text()) if partial else saved.cfg.to_dict()
        blob = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, pickle.UnpicklingError, RuntimeError, SafetensorError) as e:
        raise LmforgeError(f"{path}: corrupt checkpoint ({e})") from e
    if saved_cfg != model.cfg.to_dict():
        raise LmforgeError(f"{path}: checkpoint model config differs from the recipe's")
    if partial:
        load_trainable(path, model, saved)
    else:
        try:
            model.load_state_dict(saved.state_dict())
        except RuntimeError as e:
            raise LmforgeError(f"{path}: a full-model checkpoint does not fit this model (were lora settings "
                               "changed?)") from e
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"]["cpu"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return state
