"""Shared pieces of the benchmarks: interleaved repeated timing, median and spread, JSON results.

Every benchmark compares sides (ours and one or more peers) on a machine that may be busy. To keep
the comparison fair under noise, each round runs every side once, the order rotating from round to
round (A B, B A, A B, ...), so neither side always runs first or always runs after the other has
warmed the caches; figures are medians over rounds with their min-max and quartiles.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def interleave(sides: dict[str, Callable[[], Any]], repeat: int,
               sync: Callable[[], None] | None = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run every side once per round for `repeat` rounds, rotating the order each round.
    Returns (seconds per side per round, each side's last result). `sync` (e.g. cuda.synchronize)
    runs before the clock stops."""
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, Any] = {}
    for r in range(repeat):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            results[name] = sides[name]()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - start)
    return times, results


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and quartiles (inclusive method: well defined from 3 values up)."""
    v = sorted(values)
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else (v[0], v[0], v[0])
    return {"n": len(v), "median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q1, "q3": q3}


def ratios(num: list[float], den: list[float]) -> dict[str, float]:
    """Spread of the per-round ratio num[i] / den[i] (rounds are paired: same machine state)."""
    return spread([a / b for a, b in zip(num, den)])


def fmt(s: dict[str, float], scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """'median (min-max)' of a spread, values multiplied by scale."""
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'] * scale)}{unit} ({f.format(s['min'] * scale)}-{f.format(s['max'] * scale)}{unit})"


def inverse(s: dict[str, float], numerator: float = 1.0) -> dict[str, float]:
    """Spread of numerator / x (e.g. seconds -> items/s); min and max swap, quartiles too."""
    return {"n": s["n"], "median": numerator / s["median"], "min": numerator / s["max"],
            "max": numerator / s["min"], "q1": numerator / s["q3"], "q3": numerator / s["q1"]}


def environment() -> dict[str, Any]:
    """What the figures depend on: versions, threads, machine, load, date, commit."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        import torch
        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                   cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        pass
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def write_json(path: str | Path | None, benchmark: str, config: dict, raw: dict, summary: dict) -> None:
    """Write one result file atomically: config, per-repeat raw numbers, medians/spreads, environment."""
    if not path:
        return
    path = Path(path)
    payload = {"benchmark": benchmark, "config": config, "environment": environment(), "raw": raw,
               "summary": summary}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; results follow the user's umask
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"results written to {path}")
