"""Group rollouts for GRPO through the serving engine (`lmforge.serve.LLMEngine`).

The engine runs the training module itself (no copy of the weights). Its paged KV cache and prefix
cache hold keys/values computed with the weights of the moment, so they go stale after an optimizer
update: `sample_groups` builds a fresh engine for every rollout batch (cheap: a KV cache of a few
blocks, no weight copy), which is the "weights synced after each update" of GRPO.

Within a batch the G completions of a prompt share its KV blocks: one leader per prompt is
prefilled first, then the other G-1 are admitted and find the prompt's full blocks in the prefix
cache (`prefix_hits` counts the tokens they did not recompute).

The old-policy log-probs are the ones the engine computes while sampling (the model's distribution
before temperature, from the same weights): no second forward over the rollouts.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmforge.align.tasks import Task
from lmforge.serve.engine import EngineConfig, LLMEngine
from lmforge.serve.sequence import SamplingParams


@dataclass
class RolloutBatch:
    """N = prompts x G completions, each group adjacent. Per-token tensors are in completion space
    [N, C] (C = the longest completion), right-padded; `tokens` is prompt + completion [N, L]."""
    tokens: torch.Tensor            # [N, L] long, pad_id after each row's end
    prompt_lens: torch.Tensor       # [N]
    completion_ids: torch.Tensor    # [N, C] long, pad_id after each completion
    completion_mask: torch.Tensor   # [N, C] float 0/1
    truncated: torch.Tensor         # [N] bool: cut by max_tokens (no EOS)
    rewards: torch.Tensor           # [N] float64
    old_logprobs: torch.Tensor      # [N, C] log-probs of the completion under the sampling policy (the engine's)
    ref_logprobs: torch.Tensor | None = None
    prefix_hits: int = 0            # prompt tokens served from the prefix cache
    rollout_seconds: float = 0.0

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


def completion_positions(prompt_lens: torch.Tensor, width: int) -> torch.Tensor:
    """[N, C] column in the shifted [N, L-1] log-prob grid of each completion token: position
    p + j - 1 predicts token p + j."""
    return prompt_lens.unsqueeze(1) - 1 + torch.arange(width, device=prompt_lens.device).unsqueeze(0)


def completion_logprobs(model, tokens: torch.Tensor, prompt_lens: torch.Tensor, mask: torch.Tensor,
                        return_entropy: bool = False):
    """log pi(completion token | everything before it) -> [N, C] (0 outside the mask), and with
    return_entropy the policy's entropy at each completion position. One forward for the hidden
    states, then the LM head only at the N x C completion positions (not at the prompt's or the
    padding's), through the chunked logprobs_from_hidden (no [N, L, V] tensor). Right padding needs
    no attention mask: causal attention never lets a real token see the padding after it."""
    hidden = model(tokens[:, :-1], return_hidden=True)
    grid = completion_positions(prompt_lens, mask.shape[1]).clamp(max=hidden.shape[1] - 1)
    h = hidden.gather(1, grid.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    targets = torch.where(mask > 0, tokens.gather(1, grid + 1), -100)
    out = model.logprobs_from_hidden(h, targets, return_entropy=return_entropy)
    if not return_entropy:
        return out * mask.to(out.dtype)
    lp, ent = out
    return lp * mask.to(lp.dtype), ent * mask.to(lp.dtype)


def sample_groups(model, tokenizer, prompts: list[list[int]], group_size: int, *, max_tokens: int,
                  temperature: float, seed: int, pad_id: int, tasks: list[Task] | None = None,
                  reward_fn: Callable[[str, Task], float] | None = None, block_size: int = 4,
                  ref_model=None) -> RolloutBatch:
    """G samples per prompt through a fresh engine on `model`, with their old-policy log-probs, then
    their rewards and (with `ref_model`) the reference log-probs of every completion token."""
    model = getattr(model, "_orig_mod", model)  # the engine needs the plain module, not a compiled wrapper
    longest = max(len(p) for p in prompts) + max_tokens
    blocks = len(prompts) * group_size * (-(-longest // block_size) + 1)
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=block_size, num_blocks=blocks,
                                                      max_num_seqs=len(prompts) * group_size,
                                                      max_batched_tokens=max(512, len(prompts) * longest),
                                                      seed=seed))
    t0 = time.perf_counter()

    def params(i, g):
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=(seed * 1_000_003 + i * 1009 + g),
                              logprobs=0)
    ids = {}
    for i, p in enumerate(prompts):  # leaders first: their prefill publishes the prompt's blocks
        ids[engine.add_request(f"{i}/0", p, params(i, 0))] = (i, 0)
    outputs: dict[tuple[int, int], dict] = {k: {"ids": [], "lps": [], "reason": None} for k in ids.values()}

    def drain():
        for out in engine.step():
            o = outputs[ids[out.request_id]]
            o["ids"] += out.new_token_ids
            o["lps"] += [lp.logprob for lp in out.logprobs]
            o["reason"] = out.finish_reason
    drain()
    for i, p in enumerate(prompts):
        for g in range(1, group_size):
            ids[engine.add_request(f"{i}/{g}", p, params(i, g))] = (i, g)
            outputs[(i, g)] = {"ids": [], "lps": [], "reason": None}
    while engine.has_work:
        drain()
    rollout_seconds = time.perf_counter() - t0

    rows = [(i, g) for i in range(len(prompts)) for g in range(group_size)]
    comps = [outputs[r]["ids"] for r in rows]
    n, width = len(rows), max(max(len(c) for c in comps), 1)
    prompt_lens = torch.tensor([len(prompts[i]) for i, _ in rows])
    length = int(max(pl + len(c) for pl, c in zip(prompt_lens.tolist(), comps)))
    tokens = torch.full((n, length), pad_id, dtype=torch.long)
    completion_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros(n, width)
    sample_lp = torch.zeros(n, width)
    for r, ((i, _), c) in enumerate(zip(rows, comps)):
        full = prompts[i] + c
        tokens[r, :len(full)] = torch.tensor(full)
        completion_ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[r, :len(c)] = 1
        sample_lp[r, :len(c)] = torch.tensor(outputs[rows[r]]["lps"])
    truncated = torch.tensor([outputs[r]["reason"] == "length" for r in rows])
    rewards = torch.zeros(n, dtype=torch.float64)  # exact Python-float rewards (a digit share of 1/3 too)
    if reward_fn is not None:
        stops = engine.stop_ids
        for r, ((i, _), c) in enumerate(zip(rows, comps)):
            text = tokenizer.decode([t for t in c if t not in stops])
            rewards[r] = reward_fn(text, tasks[i])

    ref = None
    if ref_model is not None:
        device = next(ref_model.parameters()).device
        with torch.no_grad():
            ref = completion_logprobs(ref_model, tokens.to(device), prompt_lens.to(device), mask.to(device)).cpu()
    return RolloutBatch(tokens, prompt_lens, completion_ids, mask, truncated, rewards, sample_lp, ref,
                        engine.blocks.prefix_hits, rollout_seconds)


def greedy_rollouts(model, tokenizer, prompts: list[list[int]], tasks: list[Task], *, max_tokens: int, pad_id: int,
                    reward_fn: Callable[[str, Task], float] | None, autocast) -> RolloutBatch:
    """One greedy completion per held-out prompt, scored by reward_fn; the model's train/eval mode
    is restored afterwards (the held-out evaluation of GRPO and PPO)."""
    was_training = model.training
    model.eval()
    try:
        with autocast():
            return sample_groups(model, tokenizer, prompts, 1, max_tokens=max_tokens, temperature=0.0, seed=0,
                                 pad_id=pad_id, tasks=tasks, reward_fn=reward_fn)
    finally:
        model.train(was_training)
