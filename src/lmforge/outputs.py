"""Where lmforge writes: atomic files, atomic output directories, and the output-directory rule.

The rule, for every command that writes an output folder DST:
- DST missing or an empty directory: written.
- DST is a file: refused (always).
- DST is an lmforge output of the same kind (it carries MARKER, or the files of an lmforge/HF
  model, tokenizer, clean run, shard set or training run): replaced, but only the files that
  output consists of (the names listed in its MARKER, or the recognised output files when it has
  no MARKER); anything else the user put in the folder stays.
- DST is any other non-empty directory (a user's folder, or an lmforge output of another kind):
  refused unless overwrite=True; with it, the new files are written into the folder (same-named
  files and a previous lmforge output's own files replaced) and nothing else is touched.
- A tokenizer saved into a model folder is added to that model output (its files replaced by name).
lmforge never removes a file it cannot tell it wrote.

Directories are built in a hidden temp folder next to DST and renamed into place, so a crash
leaves the old output intact. When DST also holds foreign files, the new entries are renamed in
one by one instead (each rename atomic) and MARKER is written last.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path

from lmforge.errors import LmforgeError

MARKER = ".lmforge-output.json"  # {"kind": ..., "files": [top-level names or globs the output consists of]}

# Files that make a folder recognisable as an lmforge/HF output even without MARKER (older runs,
# downloaded HF models), and the entries such an output consists of.
_RECOGNISED = {
    "model": (["lmforge_model.json"], ["lmforge_model.json", "config.json", "*.safetensors",
                                       "model.safetensors.index.json", "generation_config.json",
                                       "lmforge_quant.json"]),
    "hf-model": (["config.json", "*.safetensors"], ["config.json", "*.safetensors", "model.safetensors.index.json",
                                                    "generation_config.json"]),
    "tokenizer": (["lmforge_tokenizer.json"], []),
    "clean": (["report.json", "work/manifest.json"], ["report.json", "work", "docs"]),
    "shards": (["index.json", "*.bin"], ["index.json", ".progress.json", "*.bin", "tokenizer"]),
    "speedrun": (["report.json", "clean", "tokenizer"], ["report.json", "fingerprints.json", "clean", "tokenizer",
                                                       "data", "train", "eval", "report.html"]),
    "train": (["recipe.yaml", "metrics.jsonl"], ["recipe.yaml", "metrics.jsonl", "ckpt", "model", "tensorboard",
                                                 "loss_curve.png"]),
}
_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "lmforge_tokenizer.json"]
for _kind in ("model", "hf-model", "tokenizer"):
    _RECOGNISED[_kind][1].extend(_TOKENIZER_FILES)


# --- files ----------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write via a temp file in the same folder, fsync, rename, fsync the folder; mode 0666 & ~umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2))


# --- recognising outputs --------------------------------------------------------------------------
def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _has(directory: Path, pattern: str) -> bool:
    if "/" in pattern:
        return (directory / pattern).exists()
    return any(True for _ in directory.glob(pattern))


def read_marker(directory: str | os.PathLike) -> dict | None:
    try:
        marker = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def output_kind(directory: str | os.PathLike) -> str | None:
    """The kind of lmforge/HF output `directory` holds, or None when it is not one."""
    d = Path(directory)
    if not d.is_dir():
        return None
    marker = read_marker(d)
    if marker is not None:
        return str(marker.get("kind", "unknown"))
    for kind, (needs, _) in _RECOGNISED.items():
        if all(_has(d, p) for p in needs):
            return kind
    return None


def owned_entries(directory: Path) -> set[str]:
    """Top-level names in `directory` that belong to the lmforge output it holds (empty: none)."""
    marker = read_marker(directory)
    names = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    if marker is not None:
        listed = marker.get("files")
        patterns = [n for n in listed if isinstance(n, str)] if isinstance(listed, list) else []
        return {n for n in names if _matches(n, patterns)} | {MARKER}
    kind = output_kind(directory)
    if kind is None:
        return set()
    return {n for n in names if _matches(n, _RECOGNISED[kind][1])}


# --- the rule -------------------------------------------------------------------------------------
def _family(kind: str | None) -> str | None:
    return "model" if kind == "hf-model" else kind


def _is_part(kind: str, found: str | None) -> bool:
    """A tokenizer saved into a model folder is added to it (a model folder includes its tokenizer)."""
    return kind == "tokenizer" and _family(found) == "model"


def check_destination(dst: str | os.PathLike, kind: str, overwrite: bool = False) -> None:
    """Refuse a destination lmforge must not write into (see the module docstring)."""
    dst = Path(dst)
    if dst.is_symlink() and not dst.exists():
        raise LmforgeError(f"{dst} is a dangling symlink; choose another output path")
    if dst.exists() and not dst.is_dir():
        raise LmforgeError(f"{dst} is a file; the output must be a directory (choose another path)")
    if not dst.exists() or overwrite or not any(True for _ in dst.iterdir()):
        return
    found = output_kind(dst)
    if found is None:
        raise LmforgeError(f"{dst} is a non-empty folder that is not an lmforge output; choose an empty or "
                           "new folder, or pass --overwrite to write into it (other files are kept)")
    if _family(found) != _family(kind) and not _is_part(kind, found):
        raise LmforgeError(f"{dst} holds an lmforge {found} output, not a {kind}; choose another folder, "
                           "or pass --overwrite to replace it")


def claim_output_dir(dst: str | os.PathLike, kind: str, files: list[str], overwrite: bool = False) -> Path:
    """For writers that fill a folder in place (resumable runs): check the rule, create the folder
    and mark it as a `kind` output made of the top-level entries `files`, so that later runs and
    the input readers recognise it."""
    dst = Path(dst)
    check_destination(dst, kind, overwrite)
    dst.mkdir(parents=True, exist_ok=True)
    marker = read_marker(dst)
    if marker is None or marker.get("kind") != kind or not set(files) <= set(marker.get("files") or []):
        write_marker(dst, kind, files)
    return dst


def write_marker(directory: Path, kind: str, files: list[str], **extra) -> None:
    atomic_write_json(directory / MARKER, {"kind": kind, "files": sorted(set(files)), **extra})


def new_output_dir(dst: str | os.PathLike, kind: str, overwrite: bool = False) -> Path:
    """Check the rule, then return a fresh hidden temp folder next to `dst` to build the output in."""
    dst = Path(dst)
    check_destination(dst, kind, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    return tmp


def commit_output_dir(tmp: Path, dst: str | os.PathLike, kind: str) -> Path:
    """Move the output built in `tmp` to `dst`, replacing only the previous output's own files."""
    dst = Path(dst)
    new = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
    write_marker(tmp, kind, new)
    mask = _umask()
    for f in tmp.rglob("*"):  # user's umask (some writers create 0600), durable before visible
        if f.is_symlink():
            continue
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():
            os.chmod(f, 0o777 & ~mask)
    fsync_dir(tmp)
    if not dst.exists() or (dst.is_dir() and not any(True for _ in dst.iterdir())):
        if dst.exists():
            dst.rmdir()
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
        return dst
    if _is_part(kind, output_kind(dst)):  # add the files to the model folder, keep everything else
        marker = read_marker(dst) or {"kind": output_kind(dst), "files": sorted(owned_entries(dst))}
        for name in new:
            os.replace(tmp / name, dst / name)
        write_marker(dst, marker["kind"], [*(marker.get("files") or []), *new])
        shutil.rmtree(tmp)
        fsync_dir(dst)
        return dst
    old_owned = owned_entries(dst)
    foreign = {p.name for p in dst.iterdir()} - old_owned
    if not foreign:  # only our old output is there: swap whole folders (atomic up to one rename)
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.rename(dst, old / "out")
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
        shutil.rmtree(old, ignore_errors=True)
        return dst
    # Foreign files stay: move our entries in one by one, drop the old output's leftovers, marker last.
    for name in new:
        target = dst / name
        if target.is_dir() and not target.is_symlink():
            if name not in old_owned:
                raise LmforgeError(f"{target} is a folder lmforge did not write; not replacing it")
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    for name in old_owned - set(new) - {MARKER}:
        stale = dst / name
        shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink(missing_ok=True)
    os.replace(tmp / MARKER, dst / MARKER)
    fsync_dir(dst)
    tmp.rmdir()
    return dst


def remove_entries(directory: str | os.PathLike, names: list[str]) -> None:
    """Delete the named top-level entries of an output folder (what a stage wrote), nothing else."""
    d = Path(directory)
    for name in names:
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False
