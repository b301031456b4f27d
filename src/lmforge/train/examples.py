"""Token examples for finetuning-style objectives (SFT, unlearning): token ids with a trained flag
per token, padded into a batch with labels the fused cross-entropy ignores where nothing is trained."""
from __future__ import annotations

import torch

IGNORE = -100  # the fused cross-entropy's ignore_index

Example = tuple[list[int], list[bool]]  # token ids, trained flag per token


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs [B, T] and shifted labels [B, T]; a label is kept where the token it
    predicts is trained. Padding is masked by position (past each chat's length), never by token
    id, so an end-of-turn or EOS token that equals the pad token is still trained."""
    width = max(len(ids) for ids, _ in examples) - 1
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (ids, trained) in enumerate(examples):
        n = len(ids) - 1
        tokens[row, :n] = torch.tensor(ids[:-1])
        labels[row, :n] = torch.tensor([t if keep else IGNORE for t, keep in zip(ids[1:], trained[1:])])
    return {"tokens": tokens, "labels": labels}
