"""Hostile programs against the code sandbox. Most run under three configurations: `full` (every
layer), `kernel` (kernel layers only, the Python audit hook off) and `guard` (the audit hook only:
weak isolation, explicitly allowed). Every one must be contained, reported as a failure, and leave
the harness (this test process, its files, its environment) unharmed.

The kernel layers are not optional here: on a machine without user/mount/PID/network namespaces
these tests FAIL with the sandbox's own explanation (they never skip)."""
import json
import os
import socket
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval.sandbox import SIMULATE_ENV, SandboxLimits, SandboxRefused, allowlist, run_program, run_programs

SECRET = "hunter2-do-not-leak"
FAST = dict(cpu_seconds=1.0, wall_seconds=3.0, memory_mb=512, max_processes=12)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def kernel_isolation():
    """The sandbox's layers on this machine; a loud failure (not a skip) if it refuses."""
    try:
        return run_program("pass", SandboxLimits(**FAST)).layers
    except SandboxRefused as e:
        pytest.fail(f"this machine cannot give the code sandbox kernel isolation, so its headline tests "
                    f"cannot run (CI must allow user, mount, PID and network namespaces): {e}", pytrace=False)


def limits(mode: str, **kw) -> SandboxLimits:
    weak = mode == "guard"
    return SandboxLimits(**{**FAST, **kw}, kernel=not weak, python_guard=mode != "kernel", allow_weak=weak)


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
    r = run_program("assert sum(range(4)) == 6", SandboxLimits(**FAST))
    assert r.passed and r.layers["isolation"] == "kernel"
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
    # kernel: the path does not exist in the program's root; guard: the audit hook refuses first
    assert ("No such file" in r.error) if mode == "kernel" else ("sandbox: writing" in r.error)
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


# --- what the program can see ----------------------------------------------------------------------
SNOOP = """
import json, os
def attempt(f):
    try:
        return "READ " + repr(f())[:300]
    except Exception as e:
        return "DENIED " + type(e).__name__
targets = json.loads(TARGETS)
out = {name: attempt(lambda p=path: open(p).read()) for name, path in targets["files"].items()}
out.update({name: attempt(lambda p=path: os.listdir(p)) for name, path in targets["dirs"].items()})
out["env"] = "READ " + repr(dict(os.environ)) if any("hunter2" in v for v in os.environ.values()) else "DENIED"
print(json.dumps(out))
"""


DIRS = ("$HOME", "the repository", "/", "/etc")


def snoop(tmp_path, monkeypatch, lim: SandboxLimits) -> dict:
    """Run a program that tries to read the host's secrets; -> {target: 'READ ...' | 'DENIED ...'}."""
    monkeypatch.setenv("LMFORGE_TEST_SECRET", SECRET)
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET)
    targets = {"files": {"/etc/shadow": "/etc/shadow", "/etc/passwd": "/etc/passwd",
                         "this test file": __file__, "pyproject.toml": str(REPO / "pyproject.toml"),
                         "a harness file": str(secret_file), "/proc/1/environ": "/proc/1/environ",
                         "harness environ": f"/proc/{os.getpid()}/environ"},
               "dirs": {"$HOME": os.path.expanduser("~"), "the repository": str(REPO), "/": "/", "/etc": "/etc"}}
    assert set(targets["dirs"]) == set(DIRS)
    r = run_program(f"TARGETS = {json.dumps(targets)!r}\n" + SNOOP, lim)
    assert r.passed, r.error
    return json.loads(r.stdout)


@pytest.mark.parametrize("mode", ["full", "kernel"])
@pytest.mark.parametrize("route", ["direct", "user-namespace"])
def test_host_files_and_secrets_are_invisible(mode, route, tmp_path, monkeypatch):
    if route == "user-namespace":  # the route an unprivileged harness takes; forced here when we are root
        monkeypatch.setenv(SIMULATE_ENV, "root-namespaces")
    assert Path("/etc/shadow").exists() and Path(REPO / "pyproject.toml").exists()
    seen = snoop(tmp_path, monkeypatch, limits(mode))
    files = {k: v for k, v in seen.items() if k not in DIRS}
    assert all(v.startswith("DENIED") for v in files.values()), files
    # a directory is either unlistable or shows nothing but the way to an allowlisted path
    skeleton = allowlist() + ["/proc", "/dev", "/tmp"]
    for directory in DIRS:
        if seen[directory].startswith("READ"):
            names = eval(seen[directory][5:])  # noqa: S307 - our own repr of a list of names
            path = os.path.expanduser("~") if directory == "$HOME" else str(REPO) if directory == "the repository" else directory
            leaked = [n for n in names if not any(k == os.path.join(path, n) or k.startswith(os.path.join(path, n) + "/")
                                                  for k in skeleton)]
            assert not leaked, f"{directory} shows {leaked}"


def test_the_snoop_does_read_everything_without_kernel_isolation(tmp_path, monkeypatch):
    """Control: the same program, weakly isolated, does reach the host's files (so the test above can fail)."""
    seen = snoop(tmp_path, monkeypatch, limits("guard"))
    assert seen["pyproject.toml"].startswith("READ") and seen["a harness file"] == f"READ {SECRET!r}"
    assert seen["/"].startswith("READ") and "etc" in seen["/"]


def test_program_runs_unprivileged():
    r = run_program("import os\nprint(os.getuid(), os.geteuid(), os.getgid())\n"
                    "print([l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapBnd', 'NoNewPrivs'))])",
                    SandboxLimits(**FAST))
    ids, caps = r.stdout.splitlines()
    assert ids == "65534 65534 65534"
    assert eval(caps) == ["0000000000000000", "0000000000000000", "1"]  # noqa: S307


# --- refusing to weaken silently ------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["namespaces", "filesystem", "uid"])
def test_refuses_by_default_when_a_kernel_layer_fails(layer, monkeypatch, tmp_path):
    monkeypatch.setenv(SIMULATE_ENV, layer)
    marker = tmp_path / "ran"
    with pytest.raises(SandboxRefused) as refused:
        run_program(f"open({str(marker)!r}, 'w')", SandboxLimits(**FAST, python_guard=False))
    message = str(refused.value)
    assert isinstance(refused.value, LmforgeError) and "\n" not in message
    assert f"failed: {layer} (simulated failure" in message and "active layers:" in message
    assert "sandbox.allow_weak=true" in message
    assert not marker.exists()  # nothing ran
    # explicitly allowed: it runs, and every result says it was weak and why
    r = run_program("print('ran')", SandboxLimits(**FAST, allow_weak=True))
    assert r.passed and r.stdout.strip() == "ran"
    assert r.layers["isolation"] == "weak" and layer in r.layers["failed"]


def test_switching_the_kernel_layers_off_needs_allow_weak():
    with pytest.raises(SandboxRefused, match="kernel"):
        run_program("pass", SandboxLimits(**FAST, kernel=False))
    r = run_program("pass", SandboxLimits(**FAST, kernel=False, allow_weak=True))
    assert r.passed and r.layers["isolation"] == "weak" and "kernel" in r.layers["failed"]


def test_layers_are_reported(kernel_isolation):
    layers = kernel_isolation
    assert layers["isolation"] == "kernel" and not layers["failed"]
    assert {"namespaces", "filesystem", "uid"} <= set(layers["active"])
    assert layers["rlimits"]["memory_mb"] == FAST["memory_mb"]
    assert "/etc/shadow" not in layers["active"]["filesystem"]["visible_read_only"]


def test_error_summary_is_bounded_and_printable():
    r = run_program("import sys\nsys.stderr.write('" + SECRET + "\\n')\nraise ValueError('x' * 5000 + '\\x1b[31m')",
                    SandboxLimits(**FAST))
    assert r.status == "failed" and r.error.startswith("ValueError: xxx") and len(r.error) <= 200
    assert SECRET not in r.error and "\x1b" not in r.error


# --- what evaluation records ----------------------------------------------------------------------
def test_code_task_records_layers_and_keeps_stderr_out_of_the_samples(scripted, tmp_path, monkeypatch):
    from lmforge.eval.runner import evaluate
    from lmforge.eval.tasks import make_task

    from .conftest import DATA

    # writes the secret (assembled at run time) to stderr, then a huge last line
    hostile = f"    import sys\n    sys.stderr.write({SECRET[:4]!r} + {SECRET[4:]!r} + '\\n' * 3)\n    raise ValueError('y' * 9000)\n"
    backend = scripted(generate=lambda req: hostile)
    task = make_task(f"humaneval:{DATA / 'humaneval_style.jsonl'}", {"timeout": 3.0, "limit": 2, "workers": 2})
    report = evaluate(backend, [task], tmp_path, show_progress=False)
    sandbox = report["tasks"]["humaneval"]["details"]["sandbox"]
    assert sandbox["isolation_of_samples"] == {"kernel": 2} and sandbox["layers"]["isolation"] == "kernel"
    assert json.loads((tmp_path / "report.json").read_text())["tasks"]["humaneval"]["details"]["sandbox"] == sandbox
    assert "humaneval sandbox: kernel isolation" in (tmp_path / "report.md").read_text()
    samples = (tmp_path / "humaneval_samples.jsonl").read_text()
    rows = [json.loads(line) for line in samples.splitlines()]
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert all(r["error_summary"].startswith("ValueError: yyy") and len(r["error_summary"]) <= 200 for r in rows)
    assert SECRET not in samples

    # no kernel isolation: refused before any generation, unless sandbox.allow_weak=true
    monkeypatch.setenv(SIMULATE_ENV, "namespaces")
    backend = scripted(generate=lambda req: "    return a + b\n")
    with pytest.raises(SandboxRefused, match="allow_weak"):
        evaluate(backend, [make_task(f"humaneval:{DATA / 'humaneval_style.jsonl'}", {"limit": 1})], None,
                 show_progress=False)
    assert backend.calls["generate"] == 0
    weak = make_task(f"humaneval:{DATA / 'humaneval_style.jsonl'}", {"limit": 1, "allow_weak_sandbox": True})
    report = evaluate(backend, [weak], None, show_progress=False)
    sandbox = report["tasks"]["humaneval"]["details"]["sandbox"]
    assert sandbox["isolation_of_samples"] == {"weak": 1} and "namespaces" in sandbox["layers"]["failed"]


def test_cli_sandbox_allow_weak_key(tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lmforge.cli import app

    from .conftest import DATA

    monkeypatch.setenv(SIMULATE_ENV, "uid")
    base = ["eval", str(tiny_model_dir), "--tasks", f"humaneval:{DATA / 'humaneval_style.jsonl'}",
            "-o", str(tmp_path), "--no-cache", "--no-progress", "-s", "humaneval.limit=1", "-s", "humaneval.max_new_tokens=4"]
    result = CliRunner().invoke(app, base + ["-s", "sandbox.colour=red"])
    assert isinstance(result.exception, LmforgeError) and "sandbox.allow_weak" in str(result.exception)
    result = CliRunner().invoke(app, base)
    assert isinstance(result.exception, SandboxRefused) and "failed: uid" in str(result.exception)
    result = CliRunner().invoke(app, base + ["-s", "sandbox.allow_weak=true"])
    assert result.exit_code == 0, result.output
    sandbox = json.loads((tmp_path / "report.json").read_text())["tasks"]["humaneval"]["details"]["sandbox"]
    assert sandbox["isolation_of_samples"] == {"weak": 1} and "uid" in sandbox["layers"]["failed"]
