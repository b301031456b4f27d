"""The run report: per-stage documents and bytes in and out with removal reasons, duplicate rates,
PII counts by type and throughput, as a JSON-ready dict and as a Rich table."""
from __future__ import annotations

from collections import Counter

STAGES = ("normalize", "url_dedup", "exact_dedup", "near_dedup", "quality", "pii", "toxicity", "decontam")


def empty_stage() -> dict:
    return {"docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0, "removed": {}}


def record(stats: dict, stage: str, docs_in: int, docs_out: int, bytes_in: int, bytes_out: int,
           removed: Counter | dict | None = None) -> None:
    s = stats.setdefault(stage, empty_stage())
    s["docs_in"] += docs_in
    s["docs_out"] += docs_out
    s["bytes_in"] += bytes_in
    s["bytes_out"] += bytes_out
    for reason, n in (removed or {}).items():
        s["removed"][reason] = s["removed"].get(reason, 0) + n


def merge(into: dict, other: dict) -> dict:
    """Add batch statistics `other` into `into` (stages, and flat counters such as pii)."""
    for key, value in other.items():
        if key in STAGES:
            record(into, key, value["docs_in"], value["docs_out"], value["bytes_in"], value["bytes_out"],
                   value["removed"])
        elif isinstance(value, dict):
            target = into.setdefault(key, {})
            for k, n in value.items():
                target[k] = target.get(k, 0) + n
        else:
            into[key] = into.get(key, 0) + value
    return into


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def print_report(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"lmforge data clean: {report.get('documents_in', 0):,} -> "
                        f"{report.get('documents_out', 0):,} documents", show_lines=False)
    for col, justify in [("stage", "left"), ("docs in", "right"), ("docs out", "right"), ("MB in", "right"),
                         ("MB out", "right"), ("removed (top reasons)", "left")]:
        table.add_column(col, justify=justify)
    for name in STAGES:
        s = report["stages"].get(name)
        if not s:
            continue
        reasons = sorted(s["removed"].items(), key=lambda kv: -kv[1])
        text = ", ".join(f"{r} {n:,}" for r, n in reasons[:4]) + (" ..." if len(reasons) > 4 else "")
        table.add_row(name, f"{s['docs_in']:,}", f"{s['docs_out']:,}", _mb(s["bytes_in"]), _mb(s["bytes_out"]),
                      text or "-")
    console.print(table)
    dup = report.get("duplicates", {})
    pii = report.get("pii", {})
    lines = []
    if dup:
        after = dup.get("rate_after")
        lines.append(f"duplicates: {dup['rate_before']:.1%} of documents before dedup"
                     + (f", {after:.2%} after (independent re-check)" if after is not None else "")
                     + f"; {dup.get('near_clusters', 0):,} near-dup clusters")
    if pii:
        lines.append("PII redacted: " + (", ".join(f"{k} {v:,}" for k, v in sorted(pii.items())) or "none"))
    t = report.get("throughput", {})
    if t:
        lines.append(f"throughput: {t['docs_per_s']:,.0f} docs/s, {t['mb_per_s']:.2f} MB/s "
                     f"({report.get('seconds', 0):.1f} s, engine {report.get('engine')}, {report.get('workers')} workers)")
    read = report.get("read", {})
    if read.get("skipped_total"):
        lines.append(f"input problems skipped: {read['skipped_total']:,} ("
                     + ", ".join(f"{k} {v:,}" for k, v in read["skipped"].items()) + ")")
    for line in lines:
        console.print(line, highlight=False)
