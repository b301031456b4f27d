"""Drive tasks against a backend: cached items are skipped, the rest evaluated chunk by chunk
(each chunk cached as soon as it is done), then aggregated into one report."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lmforge.errors import LmforgeError
from lmforge.eval.report import run_metadata, write_report
from lmforge.outputs import claim_output_dir
from lmforge.eval.result_cache import ResultCache
from lmforge.eval.tasks.base import Task


# what an eval output folder consists of (lmforge.outputs: only these are ever replaced)
EVAL_FILES = ["report.json", "report.md", "metrics.png", "needle_heatmap.png", "*_samples.jsonl", "cache.sqlite*"]


def evaluate(backend, tasks: list[Task], out_dir: str | Path | None = None, cache: ResultCache | None = None,
             show_progress: bool = True, console: Console | None = None, metadata: dict | None = None) -> dict:
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        claim_output_dir(out, "eval", EVAL_FILES)  # refuses a file or a user's non-empty folder
    report = {"metadata": run_metadata(backend, metadata), "tasks": {}}
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not show_progress) as progress:
        for task in tasks:
            if hasattr(task, "backend"):
                task.backend = backend  # some item lists depend on the model (e.g. needle lengths)
            items = task.items()
            keys = [it["key"] for it in items]
            if len(set(keys)) != len(keys):
                raise LmforgeError(f"task {task.name}: duplicate item keys")
            settings = task.fingerprint()
            model_id = backend.info.fingerprint()
            done = cache.get(model_id, task.name, settings, keys) if cache else {}
            todo = [it for it in items if it["key"] not in done]
            bar = progress.add_task(task.name, total=len(items), completed=len(items) - len(todo))
            started = time.perf_counter()
            for start in range(0, len(todo), task.chunk_size):
                chunk = todo[start: start + task.chunk_size]
                fresh = dict(zip((it["key"] for it in chunk), task.evaluate(backend, chunk)))
                done.update(fresh)
                if cache:
                    cache.put(model_id, task.name, settings, fresh)
                progress.advance(bar, len(chunk))
            seconds = time.perf_counter() - started
            summary = task.aggregate(items, [done[k] for k in keys], out)
            summary.update(n=len(items), from_cache=len(items) - len(todo), seconds=round(seconds, 3),
                           items_per_second=round(len(todo) / seconds, 3) if todo and seconds > 0 else None,
                           config=dataclasses.asdict(task.config))
            report["tasks"][task.name] = summary
    if out is not None:
        report["files"] = {k: str(v) for k, v in write_report(report, out).items()}
    return report
