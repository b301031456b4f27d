"""Run tables: what a good one yields, and a clear error for every kind of bad one."""
import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.plan import read_runs, write_runs


def write(tmp_path, text: str):
    path = tmp_path / "runs.csv"
    path.write_text(text)
    return path


def test_reads_columns_aliases_and_defaults_compute_to_6nd(tmp_path):
    runs = read_runs(write(tmp_path, "name,Params,tokens,val_loss\na,1e6,2e7,3.5\nb,2e6,4e7,3.2\n\n"))
    assert runs.names == ["a", "b"] and len(runs) == 2
    np.testing.assert_allclose(runs.C, 6 * runs.N * runs.D)
    runs = read_runs(write(tmp_path, "N,D,loss,C\n1e6,2e7,3.5,1.3e14\n2e6,4e7,3.2,\n"))
    assert runs.C[0] == 1.3e14 and runs.C[1] == 6 * 2e6 * 4e7 and runs.names == ["run1", "run2"]


def test_write_then_read_round_trips(tmp_path):
    rows = [{"name": f"r{i}", "N": 10 ** (6 + i), "D": 10 ** (8 + i), "C": 6 * 10 ** (14 + 2 * i), "loss": 4 - i}
            for i in range(3)]
    runs = read_runs(write_runs(tmp_path / "out" / "runs.csv", rows))
    np.testing.assert_allclose(runs.loss, [4, 3, 2])


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    ("N,D,loss\n", "no runs"),
    ("N,tokens,accuracy\n1,2,3\n", r"missing column\(s\) loss \(found: N, tokens, accuracy\)"),
    ("params\n1\n", "missing column"),
    ("N,D,loss\n1e6,2e7,abc\n", "line 2, column loss: 'abc' is not a number"),
    ("N,D,loss\n1e6,2e7,3.1\n1e6,,3.0\n", "line 3, column D: '' is not a number"),
    ("N,D,loss\n-1e6,2e7,3.1\n", "line 2, column N: must be a positive finite number"),
    ("N,D,loss\n1e6,0,3.1\n", "column D: must be a positive"),
    ("N,D,loss\n1e6,2e7,inf\n", "column loss: must be a positive finite number"),
    ("N,D,loss\n1e6,2e7,nan\n", "must be a positive finite number"),
])
def test_malformed_run_files_are_clear_errors(tmp_path, text, message):
    with pytest.raises(LmforgeError, match=message):
        read_runs(write(tmp_path, text))


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(LmforgeError, match="no such file"):
        read_runs(tmp_path / "absent.csv")
    binary = tmp_path / "runs.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(LmforgeError):
        read_runs(binary)
