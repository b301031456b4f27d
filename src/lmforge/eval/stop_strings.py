"""Cutting a completion at its first stop string (both backends apply the same rule)."""
from __future__ import annotations


def truncate_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text[:cut] if cut >= 0 else text
