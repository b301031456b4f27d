"""PNG plots of scaling-law fits (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.plan.laws import ScalingLaw
from lmforge.plan.runs import Runs


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_chinchilla_fit(runs: Runs, law: ScalingLaw, path: str | Path, title: str = "") -> Path:
    """Left: loss against compute, runs coloured by model size, with the law's compute-optimal
    frontier L(N*(C), D*(C)). Right: fitted against observed loss."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    points = left.scatter(runs.C, runs.loss, c=np.log10(runs.N), cmap="viridis", s=28, zorder=3)
    fig.colorbar(points, ax=left, label="log10 parameters")
    compute = np.logspace(np.log10(runs.C.min()) - 0.5, np.log10(runs.C.max()) + 0.5, 100)
    n_opt, d_opt = np.vectorize(law.optimal)(compute)
    left.plot(compute, law.loss(n_opt, d_opt), "k--", label="compute-optimal frontier")
    for n in np.unique(runs.N) if len(np.unique(runs.N)) <= 8 else []:
        tokens = np.logspace(np.log10(runs.D.min()) - 0.3, np.log10(runs.D.max()) + 0.3, 50)
        left.plot(6 * n * tokens, law.loss(n, tokens), color="0.6", lw=0.8)
    left.set(xscale="log", yscale="log", xlabel="training FLOPs C = 6ND", ylabel="loss",
             title=title or f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3g} + {law.B:.3g}/D^{law.beta:.3g}")
    left.legend(loc="upper right")
    predicted = law.loss(runs.N, runs.D)
    lo, hi = min(predicted.min(), runs.loss.min()), max(predicted.max(), runs.loss.max())
    right.plot([lo, hi], [lo, hi], "k:", lw=1)
    right.scatter(runs.loss, predicted, c=np.log10(runs.N), cmap="viridis", s=28)
    right.set(xlabel="observed loss", ylabel="fitted loss", title="fit quality")
    return _save(plt, fig, path)


def plot_power_law(compute, loss, law, path: str | Path) -> Path:
    """Loss against compute with the fitted L(C) = a C^-b (+ E)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(compute, loss, s=28, zorder=3, label="runs")
    grid = np.logspace(np.log10(min(compute)) - 0.3, np.log10(max(compute)) + 0.3, 100)
    label = f"{law.a:.3g} C^-{law.b:.3g}" + (f" + {law.E:.3g}" if law.E else "")
    ax.plot(grid, law.loss(grid), "k--", label=label)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="loss", title="L(C) power law")
    ax.legend()
    return _save(plt, fig, path)
