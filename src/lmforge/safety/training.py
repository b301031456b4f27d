"""Train the n-gram guard classifier on the generated sets, and score it family by family with
each attack family held out of training in turn."""
from __future__ import annotations

import random
from functools import lru_cache

import numpy as np

from lmforge.safety.analysis import analyse
from lmforge.safety.attacks import FAMILIES, Prompt, attacks
from lmforge.safety.benign import benign
from lmforge.safety.classifier import NgramClassifier, RuleClassifier
from lmforge.safety.metrics import roc_auc, threshold_at_fpr, tpr_at_fpr


def split_benign(items: list[Prompt], seed: int) -> tuple[list[Prompt], list[Prompt]]:
    order = list(range(len(items)))
    random.Random(f"{seed}:split").shuffle(order)
    half = len(order) // 2
    return [items[i] for i in order[:half]], [items[i] for i in order[half:]]


def fit(prompts: list[Prompt], seed: int = 0, target_fpr: float = 0.01, folds: int = 4) -> NgramClassifier:
    """Fit on all prompts; the threshold is the one at `target_fpr` on out-of-fold benign scores
    (a threshold read off the training data itself would be optimistic)."""
    analyses = [analyse(p.user_text()) for p in prompts]
    labels = [int(p.is_attack) for p in prompts]
    fold = [i % folds for i in range(len(prompts))]
    random.Random(f"{seed}:folds").shuffle(fold)
    oof_benign = []
    for f in range(folds):
        tr = [i for i in range(len(prompts)) if fold[i] != f]
        te = [i for i in range(len(prompts)) if fold[i] == f and not labels[i]]
        c = NgramClassifier().fit([analyses[i] for i in tr], [labels[i] for i in tr])
        oof_benign += list(c.score([analyses[i] for i in te]))
    clf = NgramClassifier().fit(analyses, labels)
    clf.threshold = max(0.5, threshold_at_fpr(oof_benign, target_fpr))
    return clf


@lru_cache(maxsize=4)
def train_default(seed: int = 0) -> NgramClassifier:
    return fit(attacks(seed=seed) + benign(seed=seed), seed)


def held_out_table(seed: int = 0, fpr: float = 0.01, per_family: int = 50, n_benign: int = 350) -> list[dict]:
    """Per family: AUC and TPR at `fpr` of the rules alone and of the classifier trained without
    that family (and without the benign test half), on that family vs the benign test half."""
    every = attacks(per_family, seed)
    train_b, test_b = split_benign(benign(n_benign, seed), seed)
    neg_rules = RuleClassifier().score([analyse(p.user_text()) for p in test_b])
    test_analyses = [analyse(p.user_text()) for p in test_b]
    rows = []
    for family in FAMILIES:
        held = [p for p in every if p.family == family]
        clf = NgramClassifier().fit([analyse(p.user_text()) for p in every if p.family != family] +
                                    [analyse(p.user_text()) for p in train_b],
                                    [1] * (len(every) - len(held)) + [0] * len(train_b))
        held_a = [analyse(p.user_text()) for p in held]
        pos, neg = clf.score(held_a), clf.score(test_analyses)
        pos_rules = RuleClassifier().score(held_a)
        rows.append({"family": family, "attacks": len(held), "benign": len(test_b),
                     "auc": roc_auc(pos, neg), "tpr_at_fpr": tpr_at_fpr(pos, neg, fpr),
                     "rules_auc": roc_auc(pos_rules, neg_rules), "rules_tpr_at_fpr": tpr_at_fpr(pos_rules, neg_rules, fpr)})
    return rows


def summary(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in ("auc", "tpr_at_fpr", "rules_auc", "rules_tpr_at_fpr")}
