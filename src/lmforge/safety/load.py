"""Name a guard scorer the way every command does: rules, trained, or a directory."""
from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.safety.classifier import (
    Classifier,
    HFClassifier,
    NgramClassifier,
    RuleClassifier,
)
from lmforge.safety.training import train_default


def load_classifier(ref: str | None) -> Classifier:
    """None or 'rules': the rules alone; a directory with guard.json: a saved n-gram model;
    another directory: an HF sequence classifier; 'trained': fit on the generated sets now."""
    if ref in (None, "", "rules"):
        return RuleClassifier()
    if ref == "trained":
        return train_default()
    path = Path(ref)
    if (path / "guard.json").is_file():
        return NgramClassifier.load(path)
    if (path / "config.json").is_file():
        return HFClassifier(path)
    raise LmforgeError(f"no guard classifier at {ref!r} (expected 'rules', 'trained', or a directory "
                       "holding guard.json or an HF config.json)")
