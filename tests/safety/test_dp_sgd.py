"""DP-SGD: per-example gradients against a per-example loop through the model's own (fused) loss,
the clipping bound, Poisson sampling, and a DP run through the training loop."""
import json

import numpy as np
import pytest
import torch

from lmforge.config import load_recipe
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.safety.accountant import epsilon
from lmforge.safety.dp_sgd import (
    PoissonLoader,
    clip_and_sum,
    dp_train,
    per_sample_gradients,
)
from lmforge.train.config import TrainRecipe
from lmforge.train.trainer import train

CFG = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32,
                  tie_embeddings=True)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(CFG).double()


def test_per_sample_gradients_equal_a_per_example_loop_fp64():
    model = tiny_model()
    tokens = torch.randint(0, 50, (4, 9))
    labels = tokens[:, 1:].clone()
    labels[1, :5] = -100  # a prompt that is not trained (SFT-style)
    batch = {"tokens": tokens[:, :-1], "labels": labels}
    losses, grads = per_sample_gradients(model, lambda fwd, b: fwd(b["tokens"], targets=b["labels"]), batch)
    for i in range(4):
        model.zero_grad()
        loss = model(tokens[i:i + 1, :-1], targets=labels[i:i + 1])  # the fused cross-entropy
        loss.backward()
        assert float(losses[i]) == pytest.approx(float(loss), abs=1e-12)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-9, atol=1e-12)


def test_clipping_bounds_each_example_and_keeps_small_ones():
    torch.manual_seed(1)
    grads = {"a": torch.randn(6, 3, 4, dtype=torch.float64), "b": torch.randn(6, 5, dtype=torch.float64)}
    grads["a"][0] *= 100   # one example far above the bound
    grads["a"][1] *= 1e-3  # one far below
    grads["b"][1] *= 1e-3
    bound = 1.0
    _, norms = clip_and_sum(grads, bound)
    for i in range(6):
        alone, _ = clip_and_sum({k: g[i:i + 1] for k, g in grads.items()}, bound)
        norm_alone = torch.cat([v.flatten() for v in alone.values()]).norm()
        assert norm_alone <= bound * (1 + 1e-9)
        if norms[i] < bound:  # untouched below the bound
            torch.testing.assert_close(alone["a"], grads["a"][i])
    full = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
    torch.testing.assert_close(norms, full)
    assert norms[0] > 10 * bound


class Windows:  # a stand-in with the ShardLoader's interface for dataset_size
    n_windows = 1000

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_poisson_sampling_rate_and_determinism():
    loader = PoissonLoader(Windows(), q=0.05, parts=2, seed=3)
    sizes = [len(loader.sample(step)) for step in range(200)]
    assert np.mean(sizes) == pytest.approx(50, rel=0.05)           # E = qN
    assert np.var(sizes) == pytest.approx(1000 * 0.05 * 0.95, rel=0.3)  # binomial, not fixed size
    first = [loader.next_batch() for _ in range(4)]
    again = PoissonLoader(Windows(), q=0.05, parts=2, seed=3)
    again.load_state_dict({"calls": 2, "inner": {}})
    assert [again.next_batch() for _ in range(2)] == first[2:]  # resumes exactly
    assert sorted(first[0] + first[1]) == loader.sample(0).tolist()


MODEL = ["model.preset=tiny", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
         "model.hidden_dim=64", "model.max_seq_len=32"]


def dp_recipe(shards, out, *extra):
    return load_recipe(TrainRecipe, None, MODEL + [
        f"train.data={shards}", f"train.out={out}", "train.seq_len=16", "train.micro_batch=8",
        "train.global_batch_tokens=256", "train.max_steps=4", "train.log_every=1", "train.eval_every=4",
        "train.eval_tokens=256", "train.ckpt_every=4", "train.tensorboard=false", "train.device=cpu",
        "train.dp.enabled=true", *extra])


def test_dp_run_logs_the_accountants_epsilon(toy_shards, tmp_path):
    out = tmp_path / "run"
    summary = dp_train(dp_recipe(toy_shards, out, "train.dp.target_epsilon=8"))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    logged = {r["step"]: r["dp_epsilon"] for r in rows if "dp_epsilon" in r}
    q, sigma = summary["dp_sample_rate"], summary["dp_noise_multiplier"]
    assert q == pytest.approx(16 / (40_000 // 16), rel=0.01)  # 2 micro-batches of 8 windows over ~2500
    for step, eps in logged.items():
        assert eps == pytest.approx(epsilon(q, sigma, step, 1e-5)[0], rel=1e-9)
    assert logged[4] == pytest.approx(summary["dp_epsilon"]) and summary["dp_epsilon"] <= 8
    assert np.isfinite(summary["final_loss"])


def test_plain_train_refuses_dp_and_bad_settings(toy_shards, tmp_path):
    with pytest.raises(LmforgeError, match="DP-SGD objective"):
        train(dp_recipe(toy_shards, tmp_path / "a"))
    with pytest.raises(LmforgeError, match="delta"):
        dp_recipe(toy_shards, tmp_path / "b", "train.dp.delta=2")
    with pytest.raises(LmforgeError, match="noise_scale"):
        dp_recipe(toy_shards, tmp_path / "c", "train.noise_scale=true", "train.global_batch_tokens=256")


def test_step_gradient_is_clipped_sum_plus_calibrated_noise(toy_shards):
    from lmforge.safety.dp_sgd import DPObjective, examples_batch
    from lmforge.train.objective import PretrainObjective

    def step_grad(sigma, bound):
        recipe = dp_recipe(toy_shards, "unused", f"train.dp.noise_multiplier={sigma:.12f}",
                           f"train.dp.max_grad_norm={bound}")
        dp = DPObjective(PretrainObjective(str(toy_shards), 16, 256, 8), recipe.train)
        loader = dp.batches(8, 0)
        model = Transformer(recipe.model_config(vocab_size=128)).double()
        torch.manual_seed(0)
        model.reset_parameters()
        micros = [loader.next_batch() for _ in range(2)]
        dp.step_gradients(model, micros, 0, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
        return model, dp, micros, {n: p.grad.clone() for n, p in model.named_parameters()}

    model, dp, micros, quiet = step_grad(0.000000000001, 1000.0)  # no clipping, no noise: the mean gradient over qN
    indices = micros[0] + micros[1]
    model.zero_grad()
    batch = examples_batch(dp.loader.inner, indices)
    losses = [model(batch[i:i + 1, :-1], targets=batch[i:i + 1, 1:]) for i in range(len(indices))]
    (torch.stack(losses).sum() / dp.expected_batch).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(quiet[name], p.grad, rtol=1e-6, atol=1e-9)
    _, dp, _, noisy = step_grad(50.0, 0.5)  # noise dominates: std sigma * C / expected batch
    flat = torch.cat([g.flatten() for g in noisy.values()])
    assert float(flat.std()) == pytest.approx(50.0 * 0.5 / dp.expected_batch, rel=0.05)
