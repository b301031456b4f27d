"""Sandbox supervisor: runs one untrusted program, contained, and prints a JSON verdict.

Started by `lmforge.eval.sandbox` as `python -I -S sandbox_supervisor.py` with an empty environment
and its job (JSON) on stdin. It stays stdlib-only so it starts in milliseconds. Process tree:

    harness -> supervisor (subreaper; new network + PID namespaces when permitted)
                 -> init (PID 1 of the new namespace: joins the pids cgroup, makes a private
                          read-only filesystem with only the sandbox dir writable and a /proc
                          that shows nothing but the sandbox)
                      -> program (python -I -B sandbox_guard.py: rlimits, no capabilities,
                                  scrubbed environment, cwd = the sandbox dir, audit hook)

Whatever happens, every process the program started is killed before the verdict is printed:
PID 1 exiting tears its namespace down, the cgroup is emptied, the program's process group is
killed, and (as child subreaper) the supervisor kills whatever got re-parented to it.
"""
from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox_linux as lx  # noqa: E402  (sibling file; this script runs outside the package)


def set_limits(job: dict, nproc_limit: int) -> None:
    mb = 1024 * 1024
    cpu = int(job["cpu_seconds"] + 0.999)
    limits = {resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
              resource.RLIMIT_AS: (job["memory_mb"] * mb,) * 2,
              resource.RLIMIT_FSIZE: (job["file_size_mb"] * mb,) * 2,
              resource.RLIMIT_NOFILE: (job["max_open_files"],) * 2,
              resource.RLIMIT_CORE: (0, 0),
              resource.RLIMIT_NPROC: (nproc_limit,) * 2}
    for which, value in limits.items():
        resource.setrlimit(which, value)


def processes_of_user(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return count


def run_init(job: dict, report, cgroup: str | None, namespaces: bool) -> None:
    """Body of the intermediate process (PID 1 when namespaces are on). Never returns."""
    layers = {}
    try:
        lx.prctl(lx.PR_SET_PDEATHSIG, signal.SIGKILL)
        if cgroup:
            lx.join_cgroup(cgroup)  # before the filesystem turns read-only
            layers["pids_cgroup"] = job["max_processes"]
        if namespaces:
            try:
                lx.unshare(lx.CLONE_NEWNS)
                layers.update(lx.private_filesystem(job["dir"], job["hide_paths"], job["keep_paths"]))
            except OSError as e:
                layers["readonly_fs"] = f"unavailable ({e})"
        nproc_limit = processes_of_user(os.getuid()) + job["max_processes"]
        layers["rlimits"] = {"cpu_s": job["cpu_seconds"], "memory_mb": job["memory_mb"],
                             "file_size_mb": job["file_size_mb"], "nproc": nproc_limit}

        def program_setup():  # runs in the program's process between fork and exec
            lx.prctl(lx.PR_SET_PDEATHSIG, signal.SIGKILL)
            set_limits(job, nproc_limit)
            if job["kernel"]:
                lx.drop_privileges()

        out = open(os.path.join(job["dir"], ".stdout"), "wb")
        err = open(os.path.join(job["dir"], ".stderr"), "wb")
        argv = [job["python"], "-I", "-B", job["guard"], job["dir"], job["program"], "1" if job["python_guard"] else "0"]
        env = {"PATH": "/usr/bin:/bin", "HOME": job["dir"], "TMPDIR": job["dir"], "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(argv, cwd=job["dir"], env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                preexec_fn=program_setup, start_new_session=True)
        report.write(json.dumps({"pid": proc.pid, "layers": layers}) + "\n")
        report.flush()
        try:
            proc.stdin.write((job["nonce"] + "\n").encode())
            proc.stdin.close()
        except OSError:
            pass  # the program died before reading its stdin
        _, status, usage = os.wait4(proc.pid, 0)
        # With a private /proc, what is left besides ourselves is what the program left running;
        # the kernel kills it all when we (PID 1) exit.
        left = sum(e.isdigit() for e in os.listdir("/proc")) - 1 if layers.get("private_proc") else 0
        report.write(json.dumps({"status": status, "cpu_s": usage.ru_utime + usage.ru_stime,
                                 "max_rss_kb": usage.ru_maxrss, "left_running": left}) + "\n")
        report.flush()
    except BaseException as e:  # noqa: BLE001 - report any setup failure, never hang
        report.write(json.dumps({"error": f"{type(e).__name__}: {e}", "layers": layers}) + "\n")
        report.flush()
    os._exit(0)


def children_of(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry))
    return out


def sweep(cgroup: str | None) -> int:
    """Kill everything still running from this job; returns how many processes had to be killed."""
    killed = 0
    for _ in range(500):
        victims = set(lx.cgroup_pids(cgroup)) if cgroup else set()
        victims |= children_of(os.getpid())
        while True:  # reap zombies first: they are dead already
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            victims.discard(pid)
        if not victims:
            return killed
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    return killed


def main() -> None:
    job = json.loads(sys.stdin.readline())
    lx.prctl(lx.PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the harness
    lx.prctl(lx.PR_SET_CHILD_SUBREAPER, 1)  # orphans of the program become our children
    layers, namespaces = {}, False
    cgroup = lx.create_pids_cgroup(job["cgroup_name"], job["max_processes"]) if job["kernel"] else None
    if job["kernel"]:
        try:
            lx.unshare(lx.CLONE_NEWNET | lx.CLONE_NEWPID)
            namespaces, layers["namespaces"] = True, "network+pid+mount"
        except OSError:
            try:
                lx.enter_user_namespace(lx.CLONE_NEWNET | lx.CLONE_NEWPID)
                namespaces, layers["namespaces"] = True, "user+network+pid+mount"
            except OSError as e:
                layers["namespaces"] = f"unavailable ({e})"
    read_fd, write_fd = os.pipe()
    init_pid = os.fork()
    if init_pid == 0:
        os.close(read_fd)
        run_init(job, os.fdopen(write_fd, "w"), cgroup, namespaces)
    os.close(write_fd)
    reader = os.fdopen(read_fd)
    started = time.monotonic()
    deadline = started + job["wall_seconds"]
    messages: list[dict] = []
    timed_out = False
    while not any("status" in m or "error" in m for m in messages):
        ready, _, _ = select.select([reader], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            timed_out = True
            break
        line = reader.readline()
        if not line:
            break  # init died without a verdict
        messages.append(json.loads(line))
    wall = time.monotonic() - started
    program_pid = next((m["pid"] for m in messages if "pid" in m), None)
    os.kill(init_pid, signal.SIGKILL)  # PID 1 of the namespace: the kernel kills the rest
    os.waitpid(init_pid, 0)
    if program_pid and not namespaces:
        try:
            os.killpg(program_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    leftovers = sweep(cgroup)
    for m in messages:
        layers.update(m.get("layers", {}))
    verdict = {"timed_out": timed_out, "wall_s": round(wall, 4), "killed_leftovers": leftovers,
               "layers": layers}
    for m in messages:
        verdict.update({k: v for k, v in m.items() if k in ("status", "cpu_s", "max_rss_kb", "error")})
    verdict["killed_leftovers"] += sum(m.get("left_running", 0) for m in messages)
    sys.stdout.write(json.dumps(verdict) + "\n")


if __name__ == "__main__":
    main()
