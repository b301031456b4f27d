"""Run untrusted (model-generated) Python programs, contained. The harness-side API.

    result = run_program(source, SandboxLimits(cpu_seconds=5))
    result.passed, result.status, result.error, result.layers

Layers (each one obtained or failed is named in `result.layers`):
- kernel, all required: new network namespace (no interface up: nothing can be reached), new PID
  namespace (other processes and their environments do not exist for the program; when its PID 1
  exits the kernel kills everything left), a private mount namespace whose root is an empty tmpfs
  holding only read-only bind mounts of the interpreter, its standard library and shared libraries,
  plus the program's own writable directory (`sandbox_rootfs`), and an unprivileged identity:
  host uid 65534 (nobody) when the harness is root, else uid 65534 in a nested user namespace;
  no capabilities, no_new_privs; a pids cgroup where one is writable;
- rlimits: CPU seconds, address space, file size, open files, processes;
- process hygiene: scrubbed environment, fresh session, cwd = the program's directory, and a
  supervisor (child subreaper) that kills every leftover process before reporting;
- Python audit hook (`python_guard=True`): refuses fork/exec/sockets/ctypes, writes outside the
  directory and reads of other processes' /proc entries with a clear error (CPython documents audit
  hooks as no sandbox: it only turns naive misbehaviour into clear errors).

If any kernel layer cannot be set up, nothing runs: `SandboxRefused` (an LmforgeError) names the
layers obtained and the ones that failed. `SandboxLimits(allow_weak=True)` (`sandbox.allow_weak=true`
on the command line) runs anyway, and every result then says `layers["isolation"] == "weak"`.
The environment variable LMFORGE_SANDBOX_SIMULATE_FAILURE=namespaces,filesystem,uid makes those
layers fail on purpose, to see (and test) that behaviour; `root-namespaces` makes a root harness
take the unprivileged (user namespace) route.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval import sandbox_linux

HERE = Path(__file__).resolve().parent
SUPERVISOR, GUARD = HERE / "sandbox_supervisor.py", HERE / "sandbox_guard.py"
OUTPUT_LIMIT = 64 * 1024  # bytes of stdout/stderr kept per program
ERROR_LIMIT = 200  # characters of the program's last stderr line kept as its error summary
SIMULATE_ENV = "LMFORGE_SANDBOX_SIMULATE_FAILURE"
KERNEL_LAYERS = ("namespaces", "filesystem", "uid")
SYSTEM_LIBRARIES = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32",
                    "/etc/ld.so.cache")


class SandboxRefused(LmforgeError):
    """Kernel isolation is unavailable and weak isolation was not explicitly allowed."""


def interpreter() -> str:
    """The real interpreter binary behind sys.executable (a venv's python is a symlink to it)."""
    return os.path.realpath(sys.executable)


def allowlist() -> list[str]:
    """Every path the program can see, read-only: the interpreter, its standard library, the
    directory holding libpython, and the system's shared-library directories."""
    stdlib = os.path.dirname(os.path.realpath(os.__file__))
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [interpreter(), stdlib, *SYSTEM_LIBRARIES]
    if libdir and os.path.isdir(libdir):
        paths.append(os.path.realpath(libdir))
    return paths


@dataclass
class SandboxLimits:
    cpu_seconds: float = 10.0
    wall_seconds: float = 20.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_open_files: int = 256
    max_processes: int = 16
    kernel: bool = True          # namespaces, allowlisted root, unprivileged uid, cgroup
    python_guard: bool = True    # the audit-hook layer
    allow_weak: bool = False     # run even when kernel layers are missing (reported as weak)


@dataclass
class SandboxResult:
    passed: bool
    status: str                  # passed, failed, timeout, cpu_limit, memory, file_size_limit, exited_early, killed, error
    error: str = ""
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    killed_leftovers: int = 0
    layers: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - OUTPUT_LIMIT))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _last_error_line(stderr: str) -> str:
    """The program's last stderr line (its exception, usually), printable characters only, bounded."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    text = "".join(c if c.isprintable() else "?" for c in lines[-1].strip())
    return text if len(text) <= ERROR_LIMIT else text[: ERROR_LIMIT - 3] + "..."


def _describe(layers: dict) -> str:
    active = list(layers.get("active", {})) + ["rlimits"] + (["python audit hook"] if layers.get("python_guard") else [])
    failed = [f"{k} ({v})" for k, v in layers.get("failed", {}).items()]
    missing = [k for k in KERNEL_LAYERS if k not in layers.get("active", {}) and k not in layers.get("failed", {})]
    return (f"active layers: {', '.join(active)}; failed: {'; '.join(failed) or 'none'}"
            + (f"; not reached: {', '.join(missing)}" if missing else ""))


def refusal_message(layers: dict) -> str:
    return ("the code sandbox refuses to run generated code without kernel isolation: " + _describe(layers)
            + ". To run it anyway with only the active layers, set sandbox.allow_weak=true "
              "(SandboxLimits(allow_weak=True)).")


def _classify(verdict: dict, stdout: str, stderr: str, nonce: str, limits: SandboxLimits) -> tuple[str, str, str]:
    """-> (status, error, stdout without the pass marker)."""
    if "error" in verdict:
        return "error", f"sandbox setup failed: {verdict['error']}", stdout
    if verdict.get("timed_out"):
        return "timeout", f"wall time limit of {limits.wall_seconds:g}s exceeded", stdout
    status = verdict.get("status")
    if status is None:
        return "error", "the sandbox reported no exit status", stdout
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and verdict.get("cpu_s", 0) >= limits.cpu_seconds - 0.05):
            return "cpu_limit", f"CPU time limit of {limits.cpu_seconds:g}s exceeded", stdout
        if sig == signal.SIGXFSZ:
            return "file_size_limit", f"file size limit of {limits.file_size_mb} MB exceeded", stdout
        return "killed", f"killed by {signal.Signals(sig).name}", stdout
    code = os.WEXITSTATUS(status)
    marker = f"\n{nonce}\n"
    if code == 0 and stdout.endswith(marker):
        return "passed", "", stdout[: -len(marker)]
    if code == 3 and "sandbox: the program exited before it finished" in stderr:
        return "exited_early", "the program called exit() before it finished", stdout
    error = _last_error_line(stderr) or f"exit status {code}"
    return ("memory" if "MemoryError" in error else "failed"), error, stdout


def run_program(source: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `source` as a Python program in a fresh sandbox. Never raises for the program's sake;
    raises SandboxRefused when the sandbox cannot isolate it and limits.allow_weak is False."""
    limits = limits or SandboxLimits()
    directory = Path(tempfile.mkdtemp(prefix="lmforge-sandbox-")).resolve()
    os.chmod(directory, 0o700)
    work = directory / "work"  # all the program sees of the host's files, besides the allowlist
    work.mkdir()
    nonce = uuid.uuid4().hex
    cgroup_name = f"lmforge-sandbox-{os.getpid()}-{nonce[:12]}"
    try:
        (work / "program.py").write_text(source, encoding="utf-8")
        shutil.copyfile(GUARD, work / "_sandbox_guard.py")
        simulate = [s.strip() for s in os.environ.get(SIMULATE_ENV, "").split(",") if s.strip()]
        job = {**asdict(limits), "readonly_paths": allowlist(), "root": str(directory / "root"), "work": str(work),
               "program": str(work / "program.py"), "guard": str(work / "_sandbox_guard.py"),
               "stdout": str(directory / ".stdout"), "stderr": str(directory / ".stderr"), "python": interpreter(),
               "nonce": nonce, "cgroup_name": cgroup_name, "simulate_failure": simulate}
        try:
            done = subprocess.run([sys.executable, "-I", "-S", str(SUPERVISOR)], input=json.dumps(job) + "\n",
                                  capture_output=True, text=True, env={}, start_new_session=True,
                                  timeout=limits.wall_seconds + 30)
        except subprocess.TimeoutExpired:
            return SandboxResult(False, "error", "the sandbox supervisor did not finish")
        try:
            verdict = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return SandboxResult(False, "error", f"sandbox supervisor failed: {_last_error_line(done.stderr)}")
        if "refused" in verdict:
            raise SandboxRefused(refusal_message(verdict.get("layers", {})))
        stdout, stderr = _tail(directory / ".stdout"), _tail(directory / ".stderr")
        status, error, stdout = _classify(verdict, stdout, stderr, nonce, limits)
        return SandboxResult(status == "passed", status, error, stdout, stderr, verdict.get("wall_s", 0.0),
                             round(verdict.get("cpu_s", 0.0), 4), verdict.get("killed_leftovers", 0),
                             verdict.get("layers", {}))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        for root in sandbox_linux.CGROUP_ROOTS:
            sandbox_linux.remove_cgroup(f"{root}/{cgroup_name}")


def check_isolation(limits: SandboxLimits | None = None) -> dict:
    """Run an empty program: its layers, or SandboxRefused before any real work is done."""
    return run_program("pass", limits).layers


def run_programs(sources: list[str], limits: SandboxLimits | None = None, workers: int | None = None,
                 on_done=None) -> list[SandboxResult]:
    """Run many programs in parallel sandboxes (threads only wait on processes)."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    results: list[SandboxResult | None] = [None] * len(sources)
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run_program, s, limits): i for i, s in enumerate(sources)}
        for future in futures:
            results[futures[future]] = future.result()
            if on_done:
                on_done()
    return results  # type: ignore[return-value]
