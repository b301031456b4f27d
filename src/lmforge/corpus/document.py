"""The unit every data stage passes along."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Document:
    id: str
    text: str
    source: str = ""
    meta: dict = field(default_factory=dict)
