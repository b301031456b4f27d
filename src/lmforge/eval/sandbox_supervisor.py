"""Sandbox supervisor: runs one untrusted program, contained, and prints a JSON verdict.

Started by `lmforge.eval.sandbox` as `python -I -S sandbox_supervisor.py` with an empty environment
and its job (JSON) on stdin. It stays stdlib-only so it starts in milliseconds. Process tree:

    harness -> supervisor (subreaper; new network + PID namespaces, through a user namespace
               when the harness is not root)
                 -> init (PID 1 of the new namespace: joins the pids cgroup, builds the allowlisted
                          root filesystem and pivots into it)
                      -> program (python -I -B guard: rlimits, unprivileged uid, no capabilities,
                                  scrubbed environment, cwd = the sandbox dir, audit hook)

Every kernel layer is required: if one cannot be set up, the program is not started and the
verdict says `refused`, naming the layers obtained and the ones that failed; only a job with
`allow_weak` runs anyway (and its verdict says `isolation: weak`).

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
import sandbox_linux as lx  # noqa: E402  (sibling files; this script runs outside the package)
import sandbox_rootfs  # noqa: E402

SANDBOX_UID = 65534  # nobody: the program's identity whenever the kernel layers are on
KERNEL_LAYERS = ("namespaces", "filesystem", "uid")


def simulate(job: dict, layer: str) -> None:
    """Lets tests (and doubtful users) see what happens when a layer cannot be set up."""
    if layer in job["simulate_failure"]:
        raise OSError(f"simulated failure of the {layer} layer (LMFORGE_SANDBOX_SIMULATE_FAILURE)")


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


def run_init(job: dict, report, cgroup: str | None, route: str | None, nproc_limit: int, failed: dict) -> None:
    """Body of the intermediate process (PID 1 when namespaces are on). Never returns.
    `failed`: the layers the supervisor could not set up."""
    active: dict = {}
    try:
        lx.prctl(lx.PR_SET_PDEATHSIG, signal.SIGKILL)
        if cgroup:
            lx.join_cgroup(cgroup)  # before the filesystem changes
            active["pids_cgroup"] = f"at most {job['max_processes']} processes"
        out = open(job["stdout"], "wb")  # opened before the host's files disappear
        err = open(job["stderr"], "wb")
        if route:
            try:
                simulate(job, "filesystem")
                if route == "host-root":  # the program runs as nobody: it must own its directory
                    for path in (job["work"], job["program"], job["guard"]):
                        os.chown(path, SANDBOX_UID, SANDBOX_UID)
                lx.unshare(lx.CLONE_NEWNS)
                active["filesystem"] = sandbox_rootfs.build_and_enter(job["root"], job["readonly_paths"], job["work"])
            except OSError as e:
                failed["filesystem"] = str(e)
        refusal = sorted(failed) if job["kernel"] else ["kernel (switched off)"]
        if refusal and not job["allow_weak"]:
            _send(report, {"refused": refusal, "layers": {"active": active, "failed": failed}})
            os._exit(0)
        layer_r, layer_w = os.pipe()

        def program_setup():  # runs in the program's process between fork and exec
            lx.prctl(lx.PR_SET_PDEATHSIG, signal.SIGKILL)
            set_limits(job, nproc_limit)
            if route:
                try:
                    if "filesystem" not in active:  # nobody may not even reach the interpreter on the host's files
                        raise OSError("not attempted without the filesystem layer")
                    simulate(job, "uid")
                    os.write(layer_w, json.dumps({"uid": lx.become_unprivileged(SANDBOX_UID, route == "userns")}).encode())
                except OSError as e:
                    os.write(layer_w, json.dumps({"uid!": str(e)}).encode())
                    if not job["allow_weak"]:
                        raise
                    lx.prctl(lx.PR_SET_NO_NEW_PRIVS, 1)

        argv = [job["python"], "-I", "-B", job["guard"], job["work"], job["program"], "1" if job["python_guard"] else "0"]
        env = {"PATH": "/usr/bin:/bin", "HOME": job["work"], "TMPDIR": job["work"], "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        try:
            proc = subprocess.Popen(argv, cwd=job["work"], env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    preexec_fn=program_setup, start_new_session=True)
        except subprocess.SubprocessError:
            proc = None  # program_setup refused: the program never started
        os.close(layer_w)
        uid = json.loads(os.read(layer_r, 65536) or "{}")
        if "uid" in uid:
            active["uid"] = uid["uid"]
        if "uid!" in uid:
            failed["uid"] = uid["uid!"]
        layers = {"active": active, "failed": failed}
        if proc is None:
            _send(report, {"refused": sorted(failed), "layers": layers})
            os._exit(0)
        _send(report, {"pid": proc.pid, "layers": layers})
        try:
            proc.stdin.write((job["nonce"] + "\n").encode())
            proc.stdin.close()
        except OSError:
            pass  # the program died before reading its stdin
        _, status, usage = os.wait4(proc.pid, 0)
        # With a private /proc, what is left besides ourselves is what the program left running;
        # the kernel kills it all when we (PID 1) exit.
        left = sum(e.isdigit() for e in os.listdir("/proc")) - 1 if "filesystem" in active else 0
        _send(report, {"status": status, "cpu_s": usage.ru_utime + usage.ru_stime,
                       "max_rss_kb": usage.ru_maxrss, "left_running": left})
    except BaseException as e:  # noqa: BLE001 - report any setup failure, never hang
        _send(report, {"error": f"{type(e).__name__}: {e}", "layers": {"active": active, "failed": failed}})
    os._exit(0)


def _send(report, message: dict) -> None:
    report.write(json.dumps(message) + "\n")
    report.flush()


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


def enter_namespaces(job: dict) -> tuple[str | None, dict, dict]:
    """New network + PID namespaces for our children: directly when we hold CAP_SYS_ADMIN (root),
    else through a new user namespace. -> (route or None, active layers, failed layers)."""
    if not job["kernel"]:
        return None, {}, {}
    try:
        simulate(job, "namespaces")
        try:
            simulate(job, "root-namespaces")  # to exercise the unprivileged route as root
            lx.unshare(lx.CLONE_NEWNET | lx.CLONE_NEWPID)
            route, how = "host-root", "network (no interface up), PID, mount"
        except OSError:
            lx.enter_user_namespace(lx.CLONE_NEWNET | lx.CLONE_NEWPID)
            route, how = "userns", "user, network (no interface up), PID, mount"
        return route, {"namespaces": how}, {}
    except OSError as e:
        return None, {}, {"namespaces": str(e)}


def main() -> None:
    job = json.loads(sys.stdin.readline())
    lx.prctl(lx.PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the harness
    lx.prctl(lx.PR_SET_CHILD_SUBREAPER, 1)  # orphans of the program become our children
    cgroup = lx.create_pids_cgroup(job["cgroup_name"], job["max_processes"]) if job["kernel"] else None
    # RLIMIT_NPROC counts every process of the program's uid, so count the ones already running
    # (from the host's /proc, before our children move to their own PID namespace)
    route, active, failed = enter_namespaces(job)
    nproc_limit = processes_of_user(SANDBOX_UID if route == "host-root" else os.getuid()) + job["max_processes"]
    read_fd, write_fd = os.pipe()
    init_pid = os.fork()
    if init_pid == 0:
        os.close(read_fd)
        run_init(job, os.fdopen(write_fd, "w"), cgroup, route, nproc_limit, dict(failed))
    os.close(write_fd)
    reader = os.fdopen(read_fd)
    started = time.monotonic()
    deadline = started + job["wall_seconds"]
    messages: list[dict] = []
    timed_out = False
    while not any(k in m for m in messages for k in ("status", "error", "refused")):
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
    if program_pid and not route:
        try:
            os.killpg(program_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    leftovers = sweep(cgroup)
    for m in messages:
        active.update(m.get("layers", {}).get("active", {}))
        failed.update(m.get("layers", {}).get("failed", {}))
    if not job["kernel"]:
        failed["kernel"] = "switched off (SandboxLimits(kernel=False))"
    strong = job["kernel"] and not failed and all(layer in active for layer in KERNEL_LAYERS)
    layers = {"isolation": "kernel" if strong else "weak", "active": active, "failed": failed,
              "rlimits": {"cpu_s": job["cpu_seconds"], "memory_mb": job["memory_mb"],
                          "file_size_mb": job["file_size_mb"], "nproc": nproc_limit},
              "python_guard": job["python_guard"]}
    verdict = {"timed_out": timed_out, "wall_s": round(wall, 4), "killed_leftovers": leftovers, "layers": layers}
    for m in messages:
        verdict.update({k: v for k, v in m.items() if k in ("status", "cpu_s", "max_rss_kb", "error", "refused")})
    verdict["killed_leftovers"] += sum(m.get("left_running", 0) for m in messages)
    sys.stdout.write(json.dumps(verdict) + "\n")


if __name__ == "__main__":
    main()
