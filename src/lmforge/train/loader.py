"""Deterministic, resumable batches of windows from memory-mapped token shards."""
from __future__ import annotations

import numpy as np
import torch

from lmforge.data.shards import TokenShards
from lmforge.errors import LmforgeError


class ShardLoader:
    """Yields [micro_batch, seq_len+1] windows. Windows start at multiples of seq_len and are
    visited in a fresh seeded permutation each epoch; the whole state is one integer (`sample`),
    so resuming is exact.

    After `shard(rank, world)` each process reads only its contiguous 1/world of every global
    micro-batch (rows rank*m/world ...), so the global batch sequence, and the state, are the same
    at any world size: a checkpoint saved at one world size resumes at another."""

    def __init__(self, shards: TokenShards, seq_len: int, micro_batch: int, seed: int = 0):
        self.shards, self.seq_len, self.micro_batch, self.seed = shards, seq_len, micro_batch, seed
        self.n_windows = (len(shards) - 1) // seq_len
        if self.n_windows < micro_batch:
            raise LmforgeError(f"{len(shards)} tokens are too few for micro_batch={micro_batch} x seq_len={seq_len}")
        self.sample = 0
        self.rank, self.world = 0, 1
        self._epoch, self._order = -1, None

    def shard(self, rank: int, world: int) -> "ShardLoader":
        if self.micro_batch % world:
            raise LmforgeError(f"train.micro_batch={self.micro_batch} must be a multiple of the data-parallel "
                               f"degree {world} (each process takes micro_batch/{world} rows)")
        self.rank, self.world = rank, world
        return self

    def _window_index(self, i: int) -> int:
        epoch, offset = divmod(i, self.n_windows)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng(self.seed + epoch).permutation(self.n_windows)
        return int(self._order[offset])

    def next_batch(self) -> torch.Tensor:
        per_rank = self.micro_batch // self.world
        mine = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        rows = [self.shards.slice(self._window_index(self.sample + j) * self.seq_len, self.seq_len + 1)
                for j in mine]
        self.sample += self.micro_batch
        return torch.from_numpy(np.stack(rows))

    def state_dict(self) -> dict:
        return {"sample": self.sample}

    def load_state_dict(self, state: dict) -> None:
        self.sample = int(state["sample"])
