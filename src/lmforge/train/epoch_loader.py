"""What every finetuning objective reads its data with: JSONL rows with file:line errors, and a
resumable loader that serves examples in a fresh seeded permutation each epoch."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError


def jsonl_rows(path: str | Path, what: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line; a missing file or bad JSON names the line."""
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"{what} not found: {path}")
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{n}: not JSON ({e.msg})") from e


class EpochLoader:
    """Micro-batches of examples, each epoch in the permutation seeded by (seed + epoch). The whole
    state is how many examples were served, so a resumed run continues with exactly the next batch.
    Subclasses turn the examples of a batch into tensors (`next_batch`)."""

    what = "examples"

    def __init__(self, examples: list, micro_batch: int, seed: int, pad_id: int):
        if len(examples) < micro_batch:
            raise LmforgeError(f"{len(examples)} {self.what} are too few for train.micro_batch={micro_batch}")
        self.examples, self.micro_batch, self.seed, self.pad_id = examples, micro_batch, seed, pad_id
        self.sample = 0
        self._epoch, self._order = -1, None

    def _index(self, i: int) -> int:
        epoch, offset = divmod(i, len(self.examples))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng(self.seed + epoch).permutation(len(self.examples))
        return int(self._order[offset])

    def next_indices(self) -> list[int]:
        index = [self._index(self.sample + j) for j in range(self.micro_batch)]
        self.sample += self.micro_batch
        return index

    def state_dict(self) -> dict:
        return {"sample": self.sample, "examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("examples", len(self.examples)) != len(self.examples):
            raise LmforgeError(f"the checkpoint was trained on {state['examples']} {self.what}, the data now gives "
                               f"{len(self.examples)}; resume with the same data and settings")
        self.sample = int(state["sample"])
