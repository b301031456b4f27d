"""`lmforge serve` on a port that is already taken: one clear line and exit code 2, before it
claims to be serving (and before it spends time loading the model)."""
import os
import socket
import subprocess
import sys


def test_port_in_use_is_a_one_line_error_before_serving_on(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        # the model does not exist: the port must be checked first, so the error is about the port
        r = subprocess.run([sys.executable, "-c", "from lmforge.cli import main; main()", "serve", str(tmp_path / "no-model"),
                            "--port", str(port)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "serving" not in r.stdout and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(port) in lines[0] and "in use" in lines[0]
