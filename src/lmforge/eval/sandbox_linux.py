"""Linux kernel isolation primitives for the code sandbox, through ctypes (stdlib only).

This module is imported by the sandbox supervisor, which runs as a plain script with `python -I -S`,
so it must not import lmforge (or torch) and must work with the standard library alone.
Every function either succeeds or raises OSError; callers record which layers they obtained.
"""
from __future__ import annotations

import ctypes
import os
import re

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 0x400, 0x800, 0x200000
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 24, 38, 36

# Flags a bind remount must repeat: inside a user namespace they are locked and dropping one is EPERM.
_KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), f"prctl({option})")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def enter_user_namespace(flags: int) -> None:
    """Unprivileged route: a new user namespace (we become its root, mapped to our own uid), plus
    whatever other namespaces `flags` asks for, which that root may then create."""
    uid, gid = os.getuid(), os.getgid()
    unshare(CLONE_NEWUSER | flags)
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def _mount_points() -> list[tuple[str, set[str]]]:
    """(mount point, options) of this mount namespace, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append((point, set(fields[5].split(","))))
    return out


def hide_directory(path: str, keep: list[str], stage: str) -> None:
    """Cover `path` (e.g. the harness user's home, which may hold credentials) with an empty tmpfs,
    re-exposing only the `keep` paths below it (the Python installation itself may live there)."""
    os.mkdir(stage)
    mount(path, stage, None, MS_BIND | MS_REC)
    mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
    for kept in keep:
        rel = os.path.relpath(kept, path)
        os.makedirs(os.path.join(path, rel), exist_ok=True)
        mount(os.path.join(stage, rel), os.path.join(path, rel), None, MS_BIND | MS_REC)
    _check(_libc.umount2(stage.encode(), ctypes.c_int(MNT_DETACH)), f"umount {stage}")
    os.rmdir(stage)


def private_filesystem(writable_dir: str, hide: list[str], keep: list[str]) -> dict:
    """In a fresh mount namespace: a /proc showing only our PID namespace, `hide` directories
    covered, and every mount read-only except `writable_dir`. Returns what was achieved."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    hidden = []
    for i, path in enumerate(hide):
        path = os.path.realpath(path)
        inside = [k for k in map(os.path.realpath, keep) if k.startswith(path + "/")]
        if not os.path.isdir(path) or path == "/" or any(os.path.realpath(k) == path for k in keep):
            continue
        hide_directory(path, inside, os.path.join(writable_dir, f".stage{i}"))
        hidden.append(path)
    mount(writable_dir, writable_dir, None, MS_BIND | MS_REC)
    failed = 0
    for point, options in _mount_points():
        if point == writable_dir or point == "/proc" or point.startswith("/proc/") or "ro" in options:
            continue
        kept = sum(flag for name, flag in _KEPT_FLAGS.items() if name in options)
        try:
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
        except OSError:
            failed += 1
    if not os.statvfs("/").f_flag & os.ST_RDONLY:
        raise OSError("the root mount is still writable")
    return {"readonly_fs": "all mounts" if not failed else f"all but {failed} mounts",
            "private_proc": True, "hidden_paths": hidden}


def drop_privileges() -> None:
    """Empty the capability bounding set and forbid privilege gain, so that even a uid-0 program
    holds no capabilities after exec (cannot remount, load modules, ptrace, raise limits)."""
    last = 63
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except OSError:
        pass
    for cap in range(last + 1):
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError:
            break  # EPERM without CAP_SETPCAP: nothing to drop from an unprivileged process
    prctl(PR_SET_NO_NEW_PRIVS, 1)


# --- cgroups: a hard cap on the number of processes (RLIMIT_NPROC does not bind uid 0) ---------
CGROUP_ROOTS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")  # cgroup v1 pids controller, then v2


def create_pids_cgroup(name: str, max_pids: int) -> str | None:
    for root in CGROUP_ROOTS:
        limit = "pids.max"
        if root == "/sys/fs/cgroup" and not os.path.exists(f"{root}/cgroup.controllers"):
            continue  # not a v2 hierarchy
        if not os.access(root, os.W_OK):
            continue
        path = f"{root}/{name}"
        try:
            os.mkdir(path)
            with open(f"{path}/{limit}", "w") as f:
                f.write(str(max_pids))
            return path
        except OSError:
            remove_cgroup(path)
    return None


def join_cgroup(path: str) -> None:
    with open(f"{path}/cgroup.procs", "w") as f:
        f.write("0")


def cgroup_pids(path: str) -> list[int]:
    try:
        with open(f"{path}/cgroup.procs") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def remove_cgroup(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
