"""Where a finetune starts: MODEL or train.init_from (default the bundled SmolLM2), and its tokenizer.
Shared by the post-training commands (lmforge.align) and the training-time safety tools (unlearning)."""
from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.model.pretrained import find_tokenizer, resolve_model_path
from lmforge.tokenizer import Tokenizer, load_tokenizer
from lmforge.train.config import TrainConfig


def starting_point(tc: TrainConfig, model: str | None, tokenizer: str | None) -> tuple[Path, Tokenizer]:
    """The model a finetune starts from (MODEL or train.init_from, default the bundled SmolLM2), recorded
    as train.init_from so that a resume reloads the same weights, and its tokenizer."""
    if model is not None and tc.init_from and model != tc.init_from:
        raise LmforgeError(f"two models given ({model!r} and train.init_from={tc.init_from!r}); give one")
    path = resolve_model_path(model or tc.init_from or None)
    if not path.exists():
        raise LmforgeError(f"model not found: {path}")
    tc.init_from = str(path)
    return path, load_tokenizer(tokenizer or find_tokenizer(path))
