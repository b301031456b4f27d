"""Hostile programs against the code sandbox. Each runs under three configurations:
`full` (every layer), `kernel` (kernel layers only, the Python audit hook off) and `guard`
(the audit hook only, no namespaces/cgroup). Every one must be contained, reported as a failure,
and leave the harness (this test process, its files, its environment) unharmed."""
import os
import socket
from pathlib import Path

import pytest

from lmforge.eval.sandbox import SandboxLimits, run_program, run_programs

SECRET = "hunter2-do-not-leak"
FAST = dict(cpu_seconds=1.0, wall_seconds=3.0, memory_mb=512, max_processes=12)


def _kernel_layers() -> dict:
    return run_program("pass", SandboxLimits(**FAST)).layers


LAYERS = _kernel_layers()
HAS_NAMESPACES = not str(LAYERS.get("namespaces", "unavailable")).startswith("unavailable")
HAS_PROCESS_CAP = "pids_cgroup" in LAYERS or os.geteuid() != 0  # RLIMIT_NPROC binds non-root users


def limits(mode: str, **kw) -> SandboxLimits:
    if mode == "kernel" and not HAS_NAMESPACES:
        pytest.skip(f"kernel namespaces not permitted here: {LAYERS.get('namespaces')}")
    return SandboxLimits(**{**FAST, **kw}, kernel=mode != "guard", python_guard=mode != "kernel")


def processes_in(directory: str) -> list[int]:
    """Processes whose cwd or command line mentions the sandbox directory (none may survive)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cwd == directory or directory in cmdline:
            found.append(int(entry))
    return found


def assert_harness_unharmed():
    assert run_program("assert sum(range(4)) == 6", SandboxLimits(**FAST)).passed
    assert os.environ.get("LMFORGE_TEST_SECRET", SECRET) == SECRET


MODES = ["full", "kernel", "guard"]


def test_good_program_passes_and_bad_ones_fail():
    ok, bad, early, hard_exit = run_programs(
        ["print('hi')\nassert 1 + 1 == 2", "assert 1 == 2, 'nope'", "import sys\nsys.exit(0)\nassert False",
         "import os\nos._exit(0)"], SandboxLimits(**FAST), workers=2)
    assert ok.passed and ok.status == "passed" and ok.stdout.strip() == "hi"
    assert not bad.passed and bad.status == "failed" and "AssertionError: nope" in bad.error
    # exiting "successfully" before the tests ran must not count as a pass
    assert not early.passed and early.status == "exited_early"
    assert not hard_exit.passed and hard_exit.status == "failed"


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_hits_cpu_limit(mode):
    r = run_program("while True:\n    pass", limits(mode, wall_seconds=30.0))  # on a busy machine CPU time accrues slowly
    assert not r.passed and r.status == "cpu_limit" and r.cpu_s < FAST["cpu_seconds"] + 1.5
    assert_harness_unharmed()


@pytest.mark.parametrize("mode", MODES)
def test_sleeping_program_hits_wall_limit(mode):
    r = run_program("import time\ntime.sleep(60)", limits(mode, wall_seconds=1.0))
    assert not r.passed and r.status == "timeout" and r.wall_s < 3
    assert_harness_unharmed()


@pytest.mark.parametrize("mode", MODES)
def test_memory_hog_is_refused(mode):
    r = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))", limits(mode))
    assert not r.passed and r.status in ("memory", "killed")
    assert_harness_unharmed()


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_is_capped_and_fully_killed(mode):
    if mode == "kernel" and not HAS_PROCESS_CAP:
        pytest.skip("running as root without a writable pids cgroup: no process-count cap to test")
    program = (
        "import os, sys, time\nprint(os.getcwd(), flush=True)\nn = 0\n"
        "try:\n    while True:\n        if os.fork() == 0:\n            os.setsid()\n            time.sleep(60)\n"
        "            os._exit(0)\n        n += 1\n"
        "except OSError as e:\n    print('forks', n, flush=True)\n    raise\n")
    r = run_program(program, limits(mode, wall_seconds=2.0))
    assert not r.passed and r.status in ("failed", "timeout")
    if mode == "guard":
        assert "os.fork is not allowed" in r.error
    else:  # the kernel stopped it: at most max_processes forks, and every child was killed
        forks = int(r.stdout.split("forks")[1])
        assert forks <= FAST["max_processes"] and r.killed_leftovers >= forks
    sandbox_dir = r.stdout.splitlines()[0]
    assert processes_in(sandbox_dir) == []
    assert_harness_unharmed()


@pytest.mark.parametrize("mode", MODES)
def test_writing_outside_the_sandbox_fails(mode, tmp_path):
    target = tmp_path / "pwned.txt"
    r = run_program(f"open({str(target)!r}, 'w').write('owned')", limits(mode))
    assert not r.passed and r.status == "failed"
    assert ("Read-only file system" in r.error) if mode == "kernel" else ("sandbox: writing" in r.error)
    r2 = run_program(f"import shutil\nshutil.rmtree({str(tmp_path)!r})", limits(mode))
    assert not r2.passed
    assert not target.exists() and tmp_path.exists()
    # writing inside its own directory is fine
    assert run_program("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'",
                       limits(mode)).passed
    assert_harness_unharmed()


@pytest.mark.parametrize("mode", MODES)
def test_network_is_unreachable(mode):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    r = run_program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                    f"s.sendall(b'leak')", limits(mode))
    assert not r.passed and r.status == "failed"
    if mode == "kernel":  # a fresh network namespace: not even the host's loopback exists
        assert "Network is unreachable" in r.error or "Connection refused" in r.error
    else:
        assert "sandbox: socket" in r.error
    with pytest.raises(socket.timeout):
        server.accept()  # nothing ever connected
    server.close()
    assert_harness_unharmed()


@pytest.mark.parametrize("mode", MODES)
def test_environment_secrets_are_unreachable(mode, monkeypatch):
    monkeypatch.setenv("LMFORGE_TEST_SECRET", SECRET)
    program = (
        "import os\nleaks = [k for k, v in os.environ.items() if 'hunter2' in v]\n"
        "for pid in [os.getppid(), 1] + [int(p) for p in os.listdir('/proc') if p.isdigit()]:\n"
        "    try:\n        data = open(f'/proc/{pid}/environ', 'rb').read()\n"
        "    except (OSError, PermissionError):\n        continue\n"
        "    if b'hunter2' in data:\n        leaks.append(pid)\n"
        "print('leaks', leaks)\nassert leaks, 'found no secret'\n")
    r = run_program(program, limits(mode))
    assert not r.passed and "found no secret" in r.error and SECRET not in r.stdout + r.stderr
    assert_harness_unharmed()


def test_home_directory_is_hidden(tmp_path):
    if not HAS_NAMESPACES:
        pytest.skip(f"kernel namespaces not permitted here: {LAYERS.get('namespaces')}")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text(SECRET)
    r = run_program(f"print(open({str(home / '.netrc')!r}).read())", SandboxLimits(**FAST, hide_paths=(str(home),)))
    assert not r.passed and "No such file" in r.error and SECRET not in r.stdout
    assert str(home) in r.layers["hidden_paths"]


def test_layers_are_reported():
    r = run_program("pass", SandboxLimits(**FAST))
    assert r.passed and r.layers["rlimits"]["memory_mb"] == FAST["memory_mb"]
    assert "namespaces" in r.layers
    if HAS_NAMESPACES:
        assert r.layers["readonly_fs"].startswith("all") and r.layers["private_proc"]
