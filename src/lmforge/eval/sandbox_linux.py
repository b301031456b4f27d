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


def umount(target: str) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(MNT_DETACH)), f"umount {target}")


# pivot_root has no libc wrapper; its number depends on the architecture
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


def pivot_root(new_root: str) -> None:
    """Make `new_root` (a mount point) this mount namespace's root and detach the old root entirely,
    so no path, `..` or open-directory trick leads back to the host's files."""
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(f"pivot_root: unknown syscall number on {os.uname().machine}")
    os.chdir(new_root)
    # pivot_root(".", ".") stacks the old root on top of the new one; unmounting "." then drops it
    _check(_libc.syscall(ctypes.c_long(number), b".", b"."), "pivot_root")
    umount(".")
    os.chdir("/")


def mount_points() -> list[tuple[str, set[str]]]:
    """(mount point, options) of this mount namespace, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append((point, set(fields[5].split(","))))
    return out


def remount_readonly(point: str, options: set[str]) -> None:
    # Flags a bind remount must repeat: inside a user namespace they are locked and dropping one is EPERM.
    kept = sum(flag for name, flag in _KEPT_FLAGS.items() if name in options)
    mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)


def drop_bounding_set() -> None:
    """Empty the capability bounding set, so no later exec can grant a capability (needs CAP_SETPCAP)."""
    last = 63
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except OSError:
        pass
    for cap in range(last + 1):
        prctl(PR_CAPBSET_DROP, cap)


def become_unprivileged(uid: int, in_user_namespace: bool) -> str:
    """Turn the calling process (about to exec the program) into `uid`, holding no capabilities.

    As real root: drop every capability from the bounding set, then switch to the host's `uid`
    (nobody): the program is an ordinary unprivileged user to the kernel. Inside a user namespace
    (unprivileged harness): enter a nested user namespace in which our identity is `uid`; the
    program then holds no capability in the namespaces that own its mounts and network."""
    if in_user_namespace:
        outer_uid, outer_gid = os.getuid(), os.getgid()
        unshare(CLONE_NEWUSER)
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {outer_uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{uid} {outer_gid} 1")
        drop_bounding_set()
        how = f"uid {uid} in a nested user namespace"
    else:
        drop_bounding_set()
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        how = f"host uid {uid}"
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError(f"still uid {os.geteuid()} after switching to {uid}")
    return f"{how}, no capabilities, no_new_privs"


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
