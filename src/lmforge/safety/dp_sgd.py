"""DP-SGD (Abadi et al. 2016) on the training loop's objective seam.

Each step samples every training example independently with probability q (Poisson sampling),
computes each sampled example's own gradient (torch.func: functional_call + grad + vmap), clips it
to L2 norm C, sums, adds N(0, σ²C²) per coordinate, and divides by the expected batch size q·N.
The privacy spent is the RDP accountant's ε for the run's δ after the steps taken so far
(`lmforge.safety.accountant`). `DPObjective` wraps any objective whose loss calls
`model(tokens, targets=...)` (pretraining, SFT) and supplies the loop's `step_gradients` hook.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, vmap

from lmforge.errors import LmforgeError
from lmforge.safety.accountant import epsilon, noise_for_epsilon
from lmforge.train.config import DPConfig, TrainConfig
from lmforge.train.examples import IGNORE


class PlainLossForward:
    """Calls a model like the Transformer, but computes `targets=` losses from full logits with
    plain autograd ops: the fused cross-entropy is a custom autograd Function that vmap cannot
    batch. Same value: the mean next-token loss over non-ignored targets."""

    def __init__(self, call, cfg):
        self.call, self.cfg = call, cfg

    def __call__(self, tokens, *args, targets=None, **kwargs):
        if targets is None:
            return self.call(tokens, *args, **kwargs)
        logits = self.call(tokens, *args, **kwargs)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp64 stays fp64
        logp = logits.log_softmax(-1)
        valid = targets != IGNORE
        picked = logp.gather(-1, torch.where(valid, targets, 0)[..., None]).squeeze(-1)
        return -(picked * valid).sum() / valid.sum().clamp_min(1)


def _unsqueeze(batch):
    if isinstance(batch, dict):
        return {k: _unsqueeze(v) for k, v in batch.items()}
    return batch[None] if isinstance(batch, torch.Tensor) else batch


def per_sample_gradients(model, loss_fn, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-example losses [B], {parameter name: per-example gradients [B, *shape]}) for the model's
    trainable parameters; loss_fn(forward, batch_of_one) -> scalar loss. A batch is a tensor or a
    dict of tensors whose first dimension is the example."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    # tied weights (lm_head = embed_tokens) appear once in named_parameters(): every alias gets the tensor
    first_name = {id(p): n for n, p in model.named_parameters()}
    aliases = {n: first_name[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}

    def one(params, example):
        def call(*args, **kwargs):
            everything = {**params, **frozen}
            weights = {alias: everything[name] for alias, name in aliases.items()}
            return functional_call(model, (weights, buffers), args, kwargs, tie_weights=False)
        return loss_fn(PlainLossForward(call, model.cfg), _unsqueeze(example))

    grads, losses = vmap(grad_and_value(one), in_dims=(None, 0), randomness="different")(trainable, batch)
    return losses, grads


def clip_and_sum(grads: dict[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each example's gradient scaled to L2 norm at most max_norm (over all parameters together),
    then summed over examples -> ({name: summed}, per-example norms before clipping [B])."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", scale.to(g.dtype), g) for n, g in grads.items()}, norms


def examples_batch(loader, indices: list[int]):
    """The training examples at `indices` as one batch, for the loaders the objectives use: token
    windows (`ShardLoader`) or lists of examples served by index (the finetuning `EpochLoader`)."""
    if hasattr(loader, "n_windows"):
        rows = [loader.shards.slice(i * loader.seq_len, loader.seq_len + 1) for i in indices]
        return torch.from_numpy(np.stack(rows))
    shim = copy.copy(loader)  # the loader's own collation, fed the chosen indices
    shim.next_indices = lambda: list(indices)
    return shim.next_batch()


def dataset_size(loader) -> int:
    if hasattr(loader, "n_windows"):
        return loader.n_windows
    if hasattr(loader, "examples") and hasattr(loader, "next_indices"):
        return len(loader.examples)
    raise LmforgeError(f"DP-SGD cannot sample examples from a {type(loader).__name__}: it needs token windows "
                       "or a list of examples")


class PoissonLoader:
    """Per optimizer step, each of the N examples is in the batch with probability q, drawn from a
    generator seeded by (seed, step) so a resumed run draws the same batches. The loop asks for
    `parts` micro-batches per step; each is a slice of the step's sampled indices."""

    def __init__(self, inner, q: float, parts: int, seed: int):
        self.inner, self.q, self.parts, self.seed = inner, q, parts, seed
        self.n = dataset_size(inner)
        self.calls = 0
        self._step, self._indices = -1, np.zeros(0, dtype=np.int64)

    def sample(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return np.flatnonzero(rng.random(self.n) < self.q)

    def next_batch(self) -> list[int]:
        step, part = divmod(self.calls, self.parts)
        if step != self._step:
            self._step, self._indices = step, self.sample(step)
        self.calls += 1
        return np.array_split(self._indices, self.parts)[part].tolist()

    def state_dict(self) -> dict:
        return {"calls": self.calls, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        self.inner.load_state_dict(state["inner"])


def noise_multiplier(dp: DPConfig, q: float, steps: int) -> float:
    """train.dp.noise_multiplier, or the smallest σ that keeps ε <= train.dp.target_epsilon after `steps`."""
    if dp.target_epsilon:
        return noise_for_epsilon(dp.target_epsilon, q, steps, dp.delta)
    return dp.noise_multiplier


class DPObjective:
    """`inner` trained with DP-SGD under train.dp: its data, loss, evaluation and model hooks, with
    the step's gradient computed by `step_gradients` (the loop's optional hook) instead of the
    plain accumulate-and-clip."""

    def __init__(self, inner, tc: TrainConfig):
        if not tc.dp.enabled:
            raise LmforgeError("DPObjective needs train.dp.enabled=true")
        self.inner, self.tc, self.dp = inner, tc, tc.dp
        self.vocab_size = inner.vocab_size
        self.expected_batch = tc.micro_batch * tc.grad_accum  # examples per step, on average
        self.q = self.sigma = self.loader = None

    def batches(self, micro_batch: int, seed: int) -> PoissonLoader:
        inner = self.inner.batches(micro_batch, seed)
        n = dataset_size(inner)
        self.q = self.expected_batch / n
        if self.q > 1:
            raise LmforgeError(f"DP-SGD: the expected batch ({self.expected_batch} examples) exceeds the "
                               f"{n} training examples; lower train.global_batch_tokens")
        self.sigma = noise_multiplier(self.dp, self.q, self.tc.max_steps)
        self.loader = PoissonLoader(inner, self.q, self.tc.grad_accum, seed)
        return self.loader

    def epsilon_after(self, steps: int) -> float:
        return epsilon(self.q, self.sigma, steps, self.dp.delta)[0]

    def loss_tokens(self, batch) -> int:
        return self.inner.loss_tokens(batch)

    def loss(self, model, batch):
        return self.inner.loss(model, batch)

    def evaluate(self, model, autocast):
        return self.inner.evaluate(model, autocast)

    def tokenizer(self):
        return self.inner.tokenizer()

    def prepare_model(self, model):
        if model.cfg.n_experts:
            raise LmforgeError("DP-SGD does not support mixture-of-experts models (routing is not per example)")
        hook = getattr(self.inner, "prepare_model", None)
        return hook(model) if hook else model

    def finish_model(self, model, out_dir):
        hook = getattr(self.inner, "finish_model", None)
        return hook(model, out_dir) if hook else (model, {})

    def step_gradients(self, model, micros: list, step: int, device, autocast):
        """Sets .grad of the trainable parameters to the step's DP-SGD gradient.
        -> (sum of the micro-batches' mean losses, metric sums for the loop to divide by the step's
        tokens, loss tokens per micro-batch, the noisy gradient's norm)."""
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        total = {n: torch.zeros_like(p) for n, p in trainable}
        losses, counts, clipped = [], [], 0
        for indices in micros:
            counts.append(0)
            for start in range(0, len(indices), self.tc.micro_batch):
                batch = examples_batch(self.loader.inner, indices[start:start + self.tc.micro_batch])
                counts[-1] += self.inner.loss_tokens(batch)
                with autocast():
                    per_loss, grads = per_sample_gradients(
                        model, lambda fwd, b: self.inner.loss(fwd, b)[0], _to(batch, device))
                summed, norms = clip_and_sum(grads, self.dp.max_grad_norm)
                for n in total:
                    total[n] += summed[n].to(total[n].dtype)
                losses.append(per_loss.detach().float())
                clipped += int((norms > self.dp.max_grad_norm).sum())
        gen = torch.Generator(device=device).manual_seed(int(self.tc.seed) * 1_000_003 + step)
        for n, p in trainable:
            noise = torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype)
            p.grad = (total[n] + noise * (self.sigma * self.dp.max_grad_norm)) / self.expected_batch
        grad_norm = torch.stack([p.grad.norm() for _, p in trainable]).norm()
        per_example = torch.cat(losses) if losses else torch.zeros(0, device=device)
        n_examples = per_example.numel()
        mean_loss = per_example.mean() if n_examples else torch.zeros((), device=device)
        scale = max(sum(counts), 1)  # the loop divides metric sums by the step's tokens
        metrics = {"dp_epsilon": self.epsilon_after(step + 1) * scale, "dp_batch": n_examples * scale,
                   "dp_clipped_frac": clipped / max(n_examples, 1) * scale}
        return mean_loss * len(micros), metrics, counts, grad_norm


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def dp_train(recipe, resume: bool = False, console=None) -> dict:
    """Pretraining (`lmforge.train.trainer.train`) with DP-SGD under recipe.train.dp; the summary
    adds the noise multiplier, sampling rate and the ε spent for δ."""
    from lmforge.config import to_dict
    from lmforge.train.objective import PretrainObjective
    from lmforge.train.trainer import TRAIN_FILES, fit

    tc = recipe.train
    if not tc.dp.enabled:
        raise LmforgeError("set train.dp.enabled=true (and train.dp.noise_multiplier or train.dp.target_epsilon)")
    recipe.model_config()
    inner = PretrainObjective(tc.data, tc.seq_len, tc.eval_tokens, tc.micro_batch)
    cfg = None if tc.init_from else recipe.model_config(vocab_size=inner.vocab_size)
    objective = DPObjective(inner, tc)
    summary = fit(objective, tc, to_dict(recipe), cfg, "train", TRAIN_FILES, resume, console)
    return {**summary, **privacy_summary(objective)}


def privacy_summary(objective: DPObjective) -> dict:
    return {"dp_epsilon": objective.epsilon_after(objective.tc.max_steps), "dp_delta": objective.dp.delta,
            "dp_noise_multiplier": objective.sigma, "dp_sample_rate": objective.q,
            "dp_max_grad_norm": objective.dp.max_grad_norm}
