"""Run untrusted (model-generated) Python programs, contained. The harness-side API.

    result = run_program(source, SandboxLimits(cpu_seconds=5))
    result.passed, result.status, result.error, result.layers

Layers, outermost first (each is reported in `result.layers`; which ones a machine grants
depends on privileges, and the sandbox says so instead of failing):
- kernel (`kernel=True`): new network namespace (no interfaces but a down loopback: nothing can
  be reached), new PID namespace with a private /proc (other processes, their environments, are
  invisible; when its PID 1 exits the kernel kills every process left in it), a private mount
  namespace where every mount is read-only except the sandbox directory and the harness user's
  home is covered by an empty tmpfs, a pids cgroup capping the number of processes (RLIMIT_NPROC
  does not bind root), and an empty capability bounding set with no_new_privs;
- rlimits: CPU seconds, address space, file size, open files, processes;
- process hygiene: scrubbed environment, fresh session, cwd = a private temp dir, and a
  supervisor (child subreaper) that kills every leftover process before reporting;
- Python audit hook (`python_guard=True`): refuses fork/exec/sockets/ctypes, writes outside the
  directory and reads of other processes' /proc entries with a clear error.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.eval import sandbox_linux

HERE = Path(__file__).resolve().parent
SUPERVISOR, GUARD = HERE / "sandbox_supervisor.py", HERE / "sandbox_guard.py"
OUTPUT_LIMIT = 64 * 1024  # bytes of stdout/stderr kept per program


def _default_hidden() -> tuple[str, ...]:
    home = os.path.expanduser("~")
    return (home,) if home not in ("/", "") else ()


@dataclass
class SandboxLimits:
    cpu_seconds: float = 10.0
    wall_seconds: float = 20.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_open_files: int = 256
    max_processes: int = 16
    kernel: bool = True          # namespaces, read-only mounts, cgroup, capabilities (where permitted)
    python_guard: bool = True    # the audit-hook layer
    hide_paths: tuple[str, ...] = field(default_factory=_default_hidden)


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
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else ""


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
    """Run `source` as a Python program in a fresh sandbox; never raises for the program's sake."""
    limits = limits or SandboxLimits()
    directory = Path(tempfile.mkdtemp(prefix="lmforge-sandbox-"))
    os.chmod(directory, 0o700)
    nonce = uuid.uuid4().hex
    cgroup_name = f"lmforge-sandbox-{os.getpid()}-{nonce[:12]}"
    try:
        (directory / "program.py").write_text(source, encoding="utf-8")
        keep = sorted({sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)), str(HERE)})
        job = {**asdict(limits), "hide_paths": list(limits.hide_paths), "keep_paths": keep,
               "dir": str(directory.resolve()), "program": str((directory / "program.py").resolve()),
               "python": sys.executable, "guard": str(GUARD), "nonce": nonce, "cgroup_name": cgroup_name}
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
        stdout, stderr = _tail(directory / ".stdout"), _tail(directory / ".stderr")
        status, error, stdout = _classify(verdict, stdout, stderr, nonce, limits)
        return SandboxResult(status == "passed", status, error, stdout, stderr, verdict.get("wall_s", 0.0),
                             round(verdict.get("cpu_s", 0.0), 4), verdict.get("killed_leftovers", 0),
                             verdict.get("layers", {}))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        for root in sandbox_linux.CGROUP_ROOTS:
            sandbox_linux.remove_cgroup(f"{root}/{cgroup_name}")


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
