"""The speedrun's one-page report (runs/NAME/report.html): loss curves, bits per byte against the
baselines, where the time went, and each stage's headline figure. Self-contained: the figures are
PNGs embedded as data URIs, so the page can be mailed or attached to an issue as one file."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from lmforge.outputs import atomic_write_text
from lmforge.train.metrics import read_metrics

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge speedrun: {name}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; max-width: 980px; margin: 2em auto; color: #222; }}
h1 {{ font-size: 1.5em; margin-bottom: 0.1em; }} .sub {{ color: #666; margin-top: 0; }}
.headline {{ font-size: 2.2em; font-weight: 600; color: #2a7a3a; }}
.figs {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }} img {{ width: 100%; }}
table {{ border-collapse: collapse; width: 100%; margin-top: 1em; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 0.35em 0.5em; text-align: left; vertical-align: top; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
</style></head><body>
<h1>lmforge speedrun: {name}</h1>
<p class="sub">{subtitle}</p>
<p class="headline">{headline}</p>
<div class="figs">{figures}</div>
<table><tr><th>stage</th><th>result</th><th>seconds</th></tr>{rows}</table>
{links}
</body></html>
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _figures(report: dict, run_dir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages, figures = report["stages"], []
    rows = read_metrics(run_dir / "train" / "metrics.jsonl") if (run_dir / "train" / "metrics.jsonl").exists() else []
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if train:
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        ax.plot(*zip(*train), label="train", color="#4878a8")
        if val:
            ax.plot(*zip(*val), "o-", label="held out", color="#d0743c")
        ax.set(xlabel="step", ylabel="loss (nats/token)", title="pretraining loss")
        ax.legend()
        fig.tight_layout()
        figures.append(_png(fig))
        plt.close(fig)
    ev = stages.get("evaluate")
    if ev:
        bars = [("this model", ev["bpb"]), ("unigram bytes", ev["unigram_baseline_bpb"]), ("uniform bytes", 8.0)]
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        ax.barh([b[0] for b in bars], [b[1] for b in bars], color=["#2a7a3a", "#999", "#bbb"])
        for i, (_, v) in enumerate(bars):
            ax.text(v, i, f" {v:.3f}", va="center")
        ax.set(xlabel="bits per byte on held-out files (lower is better)", title="held-out bits per byte")
        ax.invert_yaxis()
        ax.set_xlim(0, 9.5)
        fig.tight_layout()
        figures.append(_png(fig))
        plt.close(fig)
    timed = [(name, s["seconds"]) for name, s in stages.items() if "seconds" in s]
    if timed:
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        ax.barh([t[0] for t in timed], [t[1] for t in timed], color="#4878a8")
        ax.set(xlabel="seconds", title=f"where the {report.get('total_seconds', 0):.0f} s went")
        ax.invert_yaxis()
        fig.tight_layout()
        figures.append(_png(fig))
        plt.close(fig)
    return figures


def write_report_page(report: dict, rows: list[tuple[str, str, str]], run_dir: Path) -> Path:
    """`rows`: (stage, result, seconds) as the console report card shows them (plain text)."""
    ev = report["stages"].get("evaluate") or {}
    tr = report["stages"].get("pretrain") or {}
    headline = (f"{ev['bpb']:.3f} bits/byte held out (unigram baseline {ev['unigram_baseline_bpb']:.3f})"
                if ev else "no evaluation ran")
    subtitle = (f"{tr.get('params', 0) / 1e6:.2f} M parameters, {tr.get('steps', 0)} steps, "
                f"{tr.get('tokens_seen', 0):,} tokens; total {report.get('total_seconds', 0):.0f} s")
    cells = "".join(f"<tr><td>{html.escape(s)}</td><td>{html.escape(r)}</td><td class=num>{html.escape(t)}</td></tr>"
                    for s, r, t in rows)
    links = ('<p>Model card (data, evaluation, red-team, known limits): <a href="model_card.md">model_card.md</a>, '
             '<a href="model_card.json">model_card.json</a></p>') if (run_dir / "model_card.md").is_file() else ""
    page = PAGE.format(name=html.escape(report["name"]), subtitle=html.escape(subtitle), headline=html.escape(headline),
                       figures="".join(_figures(report, run_dir)), rows=cells, links=links)
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path
