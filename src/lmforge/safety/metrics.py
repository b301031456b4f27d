"""Detector and attack metrics: ROC AUC, TPR at a fixed FPR, bootstrap confidence intervals."""
from __future__ import annotations

import numpy as np


def roc_auc(pos, neg) -> float:
    """P(score of a random attack > score of a random benign prompt), ties counting one half
    (the Mann-Whitney U statistic over n_pos * n_neg)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def threshold_at_fpr(neg, fpr: float) -> float:
    """The lowest threshold t (predict attack when score >= t) whose FPR on `neg` is <= fpr."""
    neg = np.sort(np.asarray(neg, dtype=np.float64))[::-1]
    k = int(np.floor(fpr * len(neg) + 1e-9))  # negatives allowed at or above t
    if k >= len(neg):
        return float("-inf")
    return float(np.nextafter(neg[k], np.inf))  # just above the (k+1)-th highest negative


def tpr_at_fpr(pos, neg, fpr: float = 0.01) -> float:
    t = threshold_at_fpr(neg, fpr)
    return float(np.mean(np.asarray(pos, dtype=np.float64) >= t))


def bootstrap_ci(values, stat=np.mean, n: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(statistic, low, high): percentile bootstrap over the items (resampled with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = np.array([stat(x[rng.integers(0, len(x), len(x))]) for _ in range(n)])
    a = (1 - level) / 2
    return float(stat(x)), float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))
