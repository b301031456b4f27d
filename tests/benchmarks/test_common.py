"""The benchmarks' shared timing helpers: fair ordering, statistics against numpy, JSON results."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).parents[2] / "benchmarks" / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def test_interleave_rotates_which_side_runs_first():
    calls = []
    times, results = common.interleave({s: (lambda s=s: calls.append(s) or s) for s in "ABC"}, repeat=4)
    assert calls == list("ABC" "BCA" "CAB" "ABC")
    assert {k: len(v) for k, v in times.items()} == {"A": 4, "B": 4, "C": 4} and results == {"A": "A", "B": "B", "C": "C"}


@pytest.mark.parametrize("values", [[3.0, 1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 8.0, 7.0], [0.5, 0.25, 4.0, 1.5]])
def test_spread_matches_numpy_percentiles(values):
    s = common.spread(values)
    q1, med, q3 = np.percentile(values, [25, 50, 75])  # numpy's default linear = "inclusive" quantiles
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"]) == pytest.approx((med, q1, q3, min(values), max(values)))


def test_ratios_pair_rounds_and_inverse_swaps_the_bounds():
    r = common.ratios([2.0, 9.0, 4.0], [1.0, 3.0, 4.0])  # per-round 2, 3, 1
    assert (r["median"], r["min"], r["max"]) == (2.0, 1.0, 3.0)
    rate = common.inverse(common.spread([1.0, 2.0, 4.0]), 100.0)  # seconds -> items/s
    assert (rate["median"], rate["min"], rate["max"]) == (50.0, 25.0, 100.0)


def test_write_json_is_complete_and_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        common.write_json(tmp_path / "r.json", "demo", {"n": 1}, {"a": [1.0, 2.0]}, {"ratio": 1.5})
    finally:
        os.umask(old)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["benchmark"] == "demo" and data["raw"] == {"a": [1.0, 2.0]} and data["summary"] == {"ratio": 1.5}
    assert {"date", "torch", "torch_threads", "argv"} <= set(data["environment"])
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind
