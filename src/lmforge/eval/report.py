"""Evaluation reports: report.json (metrics, standard errors, run metadata), report.md (a table)
and metrics.png (every metric with its standard error)."""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

from lmforge.outputs import atomic_write_text


def run_metadata(backend, extra: dict | None = None) -> dict:
    import torch

    import lmforge

    return {"lmforge_version": getattr(lmforge, "__version__", "unknown"), "backend": backend.info.kind,
            "model": backend.info.model, "model_details": backend.info.details,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": sys.version.split()[0],
            "torch": torch.__version__, "platform": platform.platform(), "argv": sys.argv, **(extra or {})}


def markdown_table(report: dict) -> str:
    lines = [f"# Evaluation of `{report['metadata']['model']}`", "",
             "| task | metric | value | ± stderr | n |", "|---|---|---:|---:|---:|"]
    for name, task in report["tasks"].items():
        for metric, value in task["metrics"].items():
            se = task.get("stderr", {}).get(metric)
            se_text = f"{se:.4f}" if isinstance(se, float) and math.isfinite(se) else ""
            lines.append(f"| {name} | {metric} | {value:.4f} | {se_text} | {task['n']} |")
    lines += ["", f"backend: {report['metadata']['backend']}, started {report['metadata']['started']}"]
    for name, task in report["tasks"].items():
        sandbox = task.get("details", {}).get("sandbox")
        if sandbox:  # code tasks: say how the generated programs were contained
            layers = sandbox["layers"]
            lines.append(f"{name} sandbox: {layers.get('isolation')} isolation (layers: {', '.join(layers.get('active', {}))}"
                         f"{'; failed: ' + ', '.join(layers['failed']) if layers.get('failed') else ''}), "
                         f"samples: {sandbox['isolation_of_samples']}")
    return "\n".join(lines) + "\n"


def plot_metrics(report: dict, path: Path) -> Path | None:
    """One bar per metric that lives in [0, 1] (accuracies, pass@k); bits per byte on its own axis."""
    bars = [(f"{t}\n{m}", v, task.get("stderr", {}).get(m) or 0.0)
            for t, task in report["tasks"].items() for m, v in task["metrics"].items()
            if "perplexity" not in m and m != "bits_per_byte" and 0.0 <= v <= 1.0]
    bpb = [(t, task["metrics"]["bits_per_byte"], task.get("stderr", {}).get("bits_per_byte") or 0.0)
           for t, task in report["tasks"].items() if "bits_per_byte" in task["metrics"]]
    if not bars and not bpb:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ((bars, "score", (0, 1)), (bpb, "bits per byte (lower is better)", None)) if p[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(2 + 1.3 * sum(len(p[0]) for p in panels), 4), squeeze=False)
    for ax, (rows, label, ylim) in zip(axes[0], panels):
        ax.bar(range(len(rows)), [r[1] for r in rows], yerr=[r[2] for r in rows], capsize=4, color="#4878a8")
        ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
        ax.set_ylabel(label)
        if ylim:
            ax.set_ylim(*ylim)
    fig.suptitle(report["metadata"]["model"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, default=str))
    atomic_write_text(paths["markdown"], markdown_table(report))
    plot = plot_metrics(report, out_dir / "metrics.png")
    if plot:
        paths["plot"] = plot
    return paths
