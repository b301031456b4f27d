"""Launching torchrun worlds from tests: every launch has a hard timeout and kills its whole
process group on expiry, so a stuck collective can never hang CI."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH_TIMEOUT_S = 240


def run_torchrun(nproc: int, args: list[str], log_path, timeout: float = LAUNCH_TIMEOUT_S) -> str:
    """`torchrun --standalone --nproc-per-node nproc <args>`; returns the output, fails on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every worker it started
            proc.wait()
            pytest.fail(f"torchrun x{nproc} timed out after {timeout} s:\n{open(log_path).read()[-4000:]}")
    text = open(log_path).read()
    assert rc == 0, f"torchrun x{nproc} failed (rc {rc}):\n{text[-4000:]}"
    return text


@pytest.fixture(scope="session")
def parallel_results(tmp_path_factory):
    """One 4-rank launch of parallel_worker.py (ring attention + tensor parallel), read per rank."""
    out = tmp_path_factory.mktemp("parallel")
    run_torchrun(4, [str(Path(__file__).with_name("parallel_worker.py")), str(out)], out / "worker.log", timeout=180)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
