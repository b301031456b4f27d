"""Unlearning objectives on the training loop's seam: gradient ascent, gradient difference and NPO.

Data are (prompt, answer) examples as token ids with a trained flag per token (the SFT format): the
loss reads the answer tokens only. Each optimizer step sees a micro-batch of the forget set and,
for the methods that use one, a micro-batch of the retain set.
- ga: maximise the forget set's NLL (minimise -NLL; Jang et al. 2023).
- graddiff: ga on the forget set plus NLL on the retain set (Liu et al. 2022).
- npo: Negative Preference Optimization (Zhang et al. 2024): the forget answers as DPO losers with no
  winner, L = -(2/β) mean log σ(-β (log π_θ(y|x) - log π_ref(y|x))), plus retain_weight * retain NLL.
  At θ = θ_ref it is (2/β) log 2 and its gradient is that of mean log π_θ(y|x), so a descent step
  is gradient ascent on the answers' NLL; away from θ_ref each answer's weight 2σ(β log(π_θ/π_ref)) fades
  as an answer becomes unlikely, which is what keeps NPO from collapsing the model like ga.
The reference log-probs are computed once from the starting weights (`prepare_model`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.train.epoch_loader import EpochLoader
from lmforge.train.examples import IGNORE, Example, collate

METHODS = ("ga", "graddiff", "npo")


def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log π(answer | prompt) per example [B]: the sum of the trained tokens' log-probs."""
    return model.token_logprobs(batch["tokens"], batch["labels"]).sum(-1)


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


class ForgetRetainLoader:
    """One forget micro-batch (with its examples' indices, for the cached reference log-probs) and
    one retain micro-batch per call, each set in its own seeded permutation per epoch."""

    def __init__(self, forget: list[Example], retain: list[Example], micro_batch: int, seed: int, pad_id: int):
        self.forget = EpochLoader(forget, micro_batch, seed, pad_id)
        self.retain = EpochLoader(retain, micro_batch, seed + 1, pad_id) if retain else None
        self.pad_id = pad_id

    def next_batch(self) -> dict:
        index = self.forget.next_indices()
        batch = {"forget": collate([self.forget.examples[i] for i in index], self.pad_id),
                 "index": torch.tensor(index)}
        if self.retain is not None:
            batch["retain"] = collate([self.retain.examples[i] for i in self.retain.next_indices()], self.pad_id)
        return batch

    def state_dict(self) -> dict:
        return {"forget": self.forget.state_dict(), "retain": self.retain.state_dict() if self.retain else None}

    def load_state_dict(self, state: dict) -> None:
        self.forget.load_state_dict(state["forget"])
        if self.retain is not None:
            self.retain.load_state_dict(state["retain"])


class UnlearnObjective:
    def __init__(self, method: str, forget: list[Example], retain: list[Example], pad_id: int, vocab_size: int,
                 beta: float = 0.1, retain_weight: float = 1.0, tokenizer=None):
        if method not in METHODS:
            raise LmforgeError(f"unlearn.method must be one of {', '.join(METHODS)}, got {method!r}")
        if method == "graddiff" and not retain:
            raise LmforgeError("graddiff needs a retain set")
        if not forget:
            raise LmforgeError("the forget set is empty")
        self.method, self.forget, self.retain, self.pad_id = method, forget, retain, pad_id
        self.vocab_size, self.beta, self.retain_weight, self._tokenizer = vocab_size, beta, retain_weight, tokenizer
        self.ref_logp = None

    def batches(self, micro_batch: int, seed: int) -> ForgetRetainLoader:
        return ForgetRetainLoader(self.forget, self.retain if self.method != "ga" else [], micro_batch, seed,
                                  self.pad_id)

    def prepare_model(self, model):
        """NPO's reference: log π_ref(answer | prompt) of every forget example, from the starting weights."""
        if self.method == "npo":
            device = next(model.parameters()).device
            with torch.no_grad():
                self.ref_logp = torch.cat([
                    sequence_logprobs(model, {k: v.to(device) for k, v in collate(self.forget[i:i + 16],
                                                                                  self.pad_id).items()})
                    for i in range(0, len(self.forget), 16)])
        return model

    def loss_tokens(self, batch) -> int:
        return int((batch["forget"]["labels"] != IGNORE).sum())

    def loss(self, model, batch):
        forget = batch["forget"]
        forget_nll = model(forget["tokens"], targets=forget["labels"])
        extra = {}
        if self.method == "npo":
            logp = sequence_logprobs(model, forget)
            loss = npo_loss(logp, self.ref_logp.to(logp.device)[batch["index"]], self.beta)
        else:
            loss = -forget_nll
        if "retain" in batch and self.method != "ga":
            retain = batch["retain"]
            loss = loss + self.retain_weight * model(retain["tokens"], targets=retain["labels"])
        extra["forget_nll"] = float(forget_nll.detach())
        return loss, extra

    def evaluate(self, model, autocast) -> dict[str, float]:
        return {}

    def tokenizer(self):
        return self._tokenizer
