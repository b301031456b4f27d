"""The sandboxed program's whole filesystem: an allowlist, nothing else.

A fresh tmpfs becomes the root of the program's mount namespace. It holds read-only bind mounts
of the allowlisted paths (the interpreter, its standard library, the shared libraries it loads),
four harmless device nodes, a /proc of the sandbox's own PID namespace, and the sandbox directory,
the one writable place. The host's root is detached (pivot_root), so /etc, /home, /root, the
repository and every other path simply do not exist for the program.

Stdlib only: imported by the sandbox supervisor, which runs outside the package.
"""
from __future__ import annotations

import os

import sandbox_linux as lx

DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


def _outermost(paths: list[str]) -> list[str]:
    """Drop paths that lie under another one (binding a child after its parent would create its
    mount point on the host, through the parent's bind mount)."""
    out: list[str] = []
    for p in sorted(set(paths)):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def _mount_point(root: str, path: str, directory: bool) -> str:
    target = root + path
    os.makedirs(target if directory else os.path.dirname(target), exist_ok=True)
    if not directory and not os.path.exists(target):
        open(target, "x").close()
    return target


def build_and_enter(root: str, readonly: list[str], writable: str) -> dict:
    """In a fresh (private) mount namespace: build the allowlisted root at `root` and pivot into it.
    Returns a description of what the program can see; raises OSError if any step fails."""
    lx.mount(None, "/", None, lx.MS_REC | lx.MS_PRIVATE)  # nothing below propagates back to the host
    umask = os.umask(0o066)  # directories of the skeleton: 0711, nobody can list them
    try:
        return _build_and_enter(root, readonly, writable)
    finally:
        os.umask(umask)


def _build_and_enter(root: str, readonly: list[str], writable: str) -> dict:
    os.mkdir(root, 0o711)
    lx.mount("tmpfs", root, "tmpfs", lx.MS_NOSUID | lx.MS_NODEV, "mode=711,size=1m")
    shown, links = [], []
    for path in _outermost([os.path.abspath(p) for p in readonly]):
        if os.path.islink(path):  # e.g. /lib -> usr/lib on merged-/usr systems: same link, target bound too
            os.makedirs(os.path.dirname(root + path), exist_ok=True)
            os.symlink(os.readlink(path), root + path)
            links.append(path)
        elif os.path.exists(path):
            lx.mount(path, _mount_point(root, path, os.path.isdir(path)), None, lx.MS_BIND | lx.MS_REC)
            shown.append(path)
    for device in DEVICES:
        if os.path.exists(device):
            lx.mount(device, _mount_point(root, device, False), None, lx.MS_BIND)
    lx.mount(writable, _mount_point(root, writable, True), None, lx.MS_BIND)
    os.makedirs(root + "/proc", mode=0o555, exist_ok=True)
    try:  # hidepid=2: the program cannot even list processes it may not inspect (the sandbox's PID 1)
        lx.mount("proc", root + "/proc", "proc", lx.MS_NOSUID | lx.MS_NODEV | lx.MS_NOEXEC, "hidepid=2")
        proc = "own PID namespace, hidepid=2"
    except OSError:
        lx.mount("proc", root + "/proc", "proc", lx.MS_NOSUID | lx.MS_NODEV | lx.MS_NOEXEC)
        proc = "own PID namespace"
    lx.pivot_root(root)
    for point, options in lx.mount_points():
        if point == "/proc" or point.startswith("/proc/") or point == writable:
            continue
        if "ro" not in options:
            lx.remount_readonly(point, options)  # the tmpfs root included: nothing new can appear in /
    if not os.statvfs("/").f_flag & os.ST_RDONLY:
        raise OSError("the new root is still writable")
    return {"visible_read_only": shown + [f"{p} (symlink)" for p in links] + list(DEVICES),
            "writable": [writable], "proc": proc}
