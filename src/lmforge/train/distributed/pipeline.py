"""Pipeline parallel (torch.distributed.pipelining) on a plain Transformer, split from outside.

The model's layers are cut into `pp * v` equal stages (v = 2 stages per rank for interleaved 1F1B,
1 otherwise); stage s lives on pipeline rank s % pp. The first stage also holds the embedding, the
last the final norm and the head, whose loss is the model's own fused cross-entropy. Each rank's
stages are gathered in one `PipelinePart` whose parameters keep the plain model's names
(`layers.3.mlp.up_proj.weight`), so optimizer state, DCP checkpoints and the gathered final model
read exactly as in one process. A schedule step splits the global batch into `n_microbatches`
equal pieces, runs them through the stages and averages their losses (scale_grads), which is the
one-process accumulated step's mean when the pieces hold equal token counts.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.utils.checkpoint import checkpoint

from lmforge.errors import LmforgeError
from lmforge.model.fused_loss import linear_cross_entropy
from lmforge.model.layers import rope_cos_sin

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule == "interleaved_1f1b" else 1


class Stage(nn.Module):
    """Layers [lo, hi) of a Transformer, with the embedding if lo == 0 and the final norm and head
    if hi == n_layers: tokens or hidden states [B, T, dim] in, hidden states out (normalised on the
    last stage; the loss function applies the head)."""

    def __init__(self, model, lo: int, hi: int):
        super().__init__()
        self.cfg = model.cfg
        n = model.cfg.n_layers
        self.embed_tokens = model.embed_tokens if lo == 0 else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(lo, hi)})
        self.norm = model.norm if hi == n else None
        self.lm_head = model.lm_head if hi == n else None
        self.register_buffer("inv_freq", model.inv_freq, persistent=False)
        self.gradient_checkpointing = model.gradient_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for i, layer in self.layers.items():
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, None, int(i), None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, None, int(i), None)
        return self.norm(x) if self.norm is not None else x


class PipelinePart(nn.Module):
    """This rank's stages under the plain model's parameter names (state dicts, optimizer, DCP)."""

    def __init__(self, cfg, stages: list[Stage]):
        super().__init__()
        self.cfg = cfg
        for name in ("embed_tokens", "layers", "norm", "lm_head"):
            if name == "layers":
                self.layers = nn.ModuleDict({k: m for s in stages for k, m in s.layers.items()})
                continue
            found = [getattr(s, name) for s in stages if getattr(s, name) is not None]
            setattr(self, name, found[0] if found else None)
        self.stages = stages  # a plain list: the stage modules are not registered twice


def split_stages(model, pp_rank: int, pp: int, schedule: str) -> list[Stage]:
    """The stages of pipeline rank `pp_rank` (stage s on rank s % pp), each with n_layers / (pp * v)
    consecutive layers."""
    v = stages_per_rank(schedule)
    n = model.cfg.n_layers
    if n % (pp * v):
        raise LmforgeError(f"parallel.pp={pp} with {schedule} ({v} stage(s) per rank) must divide the model's "
                           f"n_layers={n} into {pp * v} equal stages")
    if model.cfg.tie_embeddings or model.cfg.n_experts:
        raise LmforgeError("parallel.pp needs untied embeddings and a dense model (no MoE) so far")
    per = n // (pp * v)
    return [Stage(model, s * per, (s + 1) * per) for s in range(pp_rank, pp * v, pp)]


class Pipeline:
    """A schedule over this rank's stages; `step(tokens)` runs forward and backward of a batch of
    [N, T + 1] token rows (next-token targets) and returns the mean loss on the last stage."""

    def __init__(self, part: PipelinePart, pp_rank: int, pp: int, schedule: str, n_microbatches: int,
                 device: torch.device, group=None):
        v = stages_per_rank(schedule)
        self.part, self.n_microbatches = part, n_microbatches
        stages = [PipelineStage(stage, pp_rank + i * pp, pp * v, device, group=group)
                  for i, stage in enumerate(part.stages)]
        self.last = part.lm_head is not None
        cls = SCHEDULES[schedule]
        self.schedule = cls(stages if v > 1 else stages[0], n_microbatches, loss_fn=self._loss)

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), self.part.lm_head.weight,
                                    targets.reshape(-1))

    def step(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Collective over the pipeline group; gradients accumulate into .grad as the mean over the
        micro-batches. -> the mean loss over the batch on the last stage, None elsewhere."""
        if len(tokens) % self.n_microbatches:
            raise LmforgeError(f"a batch of {len(tokens)} rows does not split into "
                               f"parallel.microbatches={self.n_microbatches} equal pipeline micro-batches")
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.part.embed_tokens is not None else ()  # the first stage reads tokens
        self.schedule.step(*args, **({"target": targets, "losses": losses} if self.last else {}))
        return torch.stack(losses).mean().detach() if self.last else None


def apply_pp(model, pp_rank: int, pp: int, schedule: str, n_microbatches: int, device: torch.device,
             group=None) -> tuple[PipelinePart, Pipeline]:
    """Split `model` into pipeline stages and keep this rank's: -> (its part, the schedule driver)."""
    if schedule not in SCHEDULES:
        raise LmforgeError(f"parallel.pp_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    part = PipelinePart(model.cfg, split_stages(model, pp_rank, pp, schedule))
    return part, Pipeline(part, pp_rank, pp, schedule, n_microbatches, device, group)
