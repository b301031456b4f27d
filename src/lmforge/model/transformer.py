"""The one model class used for training, finetuning, evaluation and serving."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.fused_loss import linear_cross_entropy, softcap
from lmforge.model.layers import Block, MoE, RMSNorm, rope_cos_sin, rope_inv_freq
from lmforge.model.logprobs import token_logprobs
from lmforge.model.packing import packed_layout


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False
        self.z_loss = 0.0  # a training setting (train.z_loss), not part of the architecture
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, std) everywhere; output projections of each residual branch scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance stays flat with depth (GPT-2)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                last_only: bool = False, targets: torch.Tensor | None = None,
                logits_index: torch.Tensor | None = None, *, doc_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab] (or [B, 1, vocab] with last_only).

        With targets [B, T] (already shifted, -100 to ignore) it returns the mean cross-entropy
        (plus self.z_loss * logsumexp^2 when set) instead, fused with the LM head so the full
        logits are never materialised. Logits are soft-capped when cfg.logit_softcap is set, on
        every path (logits, loss, token_logprobs).
        positions default to 0..T-1, or continue from the cache's length when a cache is given.
        logits_index [K] computes logits only at those time steps -> [B, K, vocab] (a serving
        batch packs many sequences into one row and needs only each one's last position).
        doc_ids [B, T] packs several documents per row: attention stays inside each run of equal
        ids and positions restart at 0 in each. attention_mask [B, T] (1 = real token) hides
        padding and numbers the real tokens from 0, so left, right or no padding agree.
        return_hidden gives the final-norm hidden states [B, T, dim] instead of logits.
        """
        B, T = tokens.shape
        mask = None
        if doc_ids is not None or attention_mask is not None:
            if cache is not None:
                raise LmforgeError("doc_ids / attention_mask cannot be combined with a KV cache")
            derived, mask = packed_layout(tokens.shape, doc_ids, attention_mask, tokens.device)
            if positions is None:
                positions = derived
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, None, i, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if return_hidden:
            return x
        if targets is not None:
            return linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                        softcap=self.cfg.logit_softcap, z_loss=self.z_loss)
        if last_only:
            x = x[:, -1:]
        elif logits_index is not None:
            x = x[:, logits_index]
        return self.logits(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final-norm hidden states, soft-capped when the config says so: every
        caller that turns hidden states into logits goes through here."""
        return softcap(self.lm_head(hidden), self.cfg.logit_softcap)

    def token_logprobs(self, tokens: torch.Tensor, targets: torch.Tensor, *, positions=None, doc_ids=None,
                       attention_mask=None, return_entropy: bool = False, chunk_rows: int | None = None):
        """log p(targets[b, t] | tokens[b, :t+1]) -> [B, T] (fp32), 0 where targets is -100; the
        [B, T, vocab] logits are never materialised. With return_entropy also the per-position
        entropy [B, T]. Keyword arguments as in forward (packing, padding)."""
        hidden = self(tokens, positions, doc_ids=doc_ids, attention_mask=attention_mask, return_hidden=True)
        return self.logprobs_from_hidden(hidden, targets, return_entropy=return_entropy, chunk_rows=chunk_rows)

    def logprobs_from_hidden(self, hidden: torch.Tensor, targets: torch.Tensor, *, return_entropy: bool = False,
                             chunk_rows: int | None = None):
        """token_logprobs on hidden states from forward(return_hidden=True), so a value or reward
        head can share the same forward pass."""
        B, T, D = hidden.shape
        out = token_logprobs(hidden.reshape(-1, D), self.lm_head.weight, targets.reshape(-1),
                             chunk_rows=chunk_rows, return_entropy=return_entropy, softcap=self.cfg.logit_softcap)
        if return_entropy:
            return out[0].view(B, T), out[1].view(B, T)
        return out.view(B, T)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE load-balancing losses of the last forward pass (0 for dense models)."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE)]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.inv_freq.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() de-duplicates tied weights


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy; targets are already shifted (targets[t] = tokens[t+1])."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=ignore_index)
