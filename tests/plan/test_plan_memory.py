"""The memory planner against the ZeRO paper, Korthikanti et al., the seed checklist, and a measured model."""
import pytest

from lmforge.errors import LmforgeError
from lmforge.model.config import preset
from lmforge.plan import TrainingPlan, check_fit, get_gpu, model_state_bytes, training_memory
from lmforge.plan.activations import LayerShape, gpt_layer_bytes, layer_bytes

GB = 1e9

# Rajbhandari et al. (2020), Table 1: per-GPU model-state memory (GB) of a 7.5B-parameter model
# with mixed-precision Adam (K = 12), by data-parallel degree: baseline, P_os, P_os+g, P_os+g+p.
ZERO_TABLE_7_5B = {
    1: (120, 120, 120, 120),
    4: (120, 52.5, 41.3, 30),
    16: (120, 35.6, 21.6, 7.5),
    64: (120, 31.4, 16.6, 1.88),
    256: (120, 30.4, 15.4, 0.47),
    1024: (120, 30.1, 15.1, 0.12),
}


@pytest.mark.parametrize("dp", sorted(ZERO_TABLE_7_5B))
def test_zero_paper_table_for_a_7_5b_model(dp):
    for stage, expected in enumerate(ZERO_TABLE_7_5B[dp]):
        states = model_state_bytes(7.5e9, dp=dp, zero=stage)
        total = states["weights"] + states["gradients"] + states["optimizer"]
        # The paper prints 3 significant figures.
        assert total / GB == pytest.approx(expected, rel=5e-3, abs=6e-3), (dp, stage)


def test_zero_3_puts_a_trillion_parameters_on_1024_gpus_at_15_6_gb():
    states = model_state_bytes(1e12, dp=1024, zero=3)
    assert sum(v for k, v in states.items() if k != "cpu") / GB == pytest.approx(15.6, abs=0.05)


def test_training_memory_uses_the_same_model_states():
    cfg = preset("7b")
    n = cfg.num_params()
    for stage in range(4):
        est = training_memory(cfg, TrainingPlan(dp=64, zero=stage, micro_batch=1, seq_len=4096))
        states = model_state_bytes(n, 64, stage)
        assert est.parts["optimizer"] == pytest.approx(states["optimizer"])
        assert est.parts["gradients"] == pytest.approx(states["gradients"])
        assert est.parts["weights"] == pytest.approx(states["weights"])
    base = training_memory(cfg, TrainingPlan(dp=64))
    assert base.parts["weights"] + base.parts["gradients"] + base.parts["optimizer"] == 16 * n


def test_offload_moves_optimizer_and_weights_to_cpu():
    states = model_state_bytes(1e9, dp=8, zero=3, offload="params")
    assert states["optimizer"] == states["weights"] == 0
    assert states["cpu"] == pytest.approx((12 + 2) * 1e9 / 8)
    with pytest.raises(LmforgeError, match="needs ZeRO stage 3"):
        model_state_bytes(1e9, dp=8, zero=2, offload="params")


def gpt_shape(h, a):
    return LayerShape(hidden=h, heads=a, kv_hidden=h, ffn=4 * h, glu=False, dropout=True)


@pytest.mark.parametrize("t", [1, 2, 8])
def test_activation_accounting_reduces_to_korthikanti_for_gpt_layers(t):
    s, b, h, a = 2048, 4, 12288, 96   # GPT-3 175B shapes
    shape = gpt_shape(h, a)
    assert layer_bytes(shape, s, b, t) == pytest.approx(gpt_layer_bytes(s, b, h, a, t))
    if t > 1:
        assert layer_bytes(shape, s, b, t, sp=True) == pytest.approx(gpt_layer_bytes(s, b, h, a, t, sp=True))
    # The paper's closed forms for recomputation (section 5): selective + SP = 34sbh/t, full = 2sbh(/t).
    assert layer_bytes(shape, s, b, t, sp=t > 1, recompute="selective") == pytest.approx(34 * s * b * h / t)
    assert layer_bytes(shape, s, b, t, recompute="full") == 2 * s * b * h
    assert gpt_layer_bytes(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)


def test_seed_checklist_1b_layout_fits_under_35_gb_per_a100_40gb():
    # The seed checklist: a 1B Llama (40 layers, hidden 2048, intermediate 5504) on 8 x A100-40GB
    # with TP=2, PP=4 should stay under 35 GB per GPU.
    cfg = preset("1b")
    assert (cfg.n_layers, cfg.dim, cfg.hidden_dim) == (40, 2048, 5504)
    plan = TrainingPlan(micro_batch=1, seq_len=2048, tp=2, pp=4)
    verdict = check_fit(cfg, plan, get_gpu("a100-40gb"))
    est = verdict.estimate
    assert verdict.fits and est.total < 35 * GB
    # The first stage is the largest: 10 layers plus the embedding, split over 2 TP ranks, 16 B/param ...
    block = (cfg.num_params() - 2 * cfg.vocab_size * cfg.dim - cfg.dim) // 40
    shard = (10 * block + cfg.vocab_size * cfg.dim) / 2
    assert est.stage == "first" and est.params_per_gpu == shard
    assert est.parts["weights"] + est.parts["gradients"] + est.parts["optimizer"] == 16 * shard
    # ... and holds 4 micro-batches in flight of 10 layers each (1F1B) = 40 layers of activations:
    # replicated 8sbh (norm, QKV and MLP inputs) + (Q, K, V, attention output, 4 SwiGLU tensors, s^2 softmax) / 2.
    s, h, f, a = 2048, 2048, 5504, 16
    per_layer = s * 8 * h + (s * (2 * h + 4 * h + 2 * h + 8 * f) + 2 * a * s * s) / 2
    assert est.parts["activations"] == pytest.approx(40 * per_layer)
    # Eight sequences per micro-batch do not fit; recomputing activations or flash attention would.
    verdict = check_fit(cfg, TrainingPlan(micro_batch=8, seq_len=2048, tp=2, pp=4), get_gpu("a100-40gb"))
    assert not verdict.fits
    changes = [s.change for s in verdict.suggestions]
    assert "selective activation recomputation" in changes and any("flash" in c for c in changes)


def test_seed_claim_7b_on_one_80gb_gpu_needs_cpu_offload():
    # "7B + 4k sequence + ZeRO-3 + flash attention trains at batch 1 on one 80 GB card": with a single
    # GPU ZeRO shards nothing, so the 16 B/param of model states (108 GB) must leave the GPU.
    cfg = preset("7b")
    plan = TrainingPlan(micro_batch=1, seq_len=4096, zero=3, flash=True)
    verdict = check_fit(cfg, plan, get_gpu("h100"))
    assert not verdict.fits and verdict.estimate.total > 100 * GB
    changes = {s.change: s for s in verdict.suggestions}
    assert any("offload" in c for c in changes)
    offloaded = training_memory(cfg, TrainingPlan(micro_batch=1, seq_len=4096, zero=3, flash=True, offload="params"))
    assert offloaded.total < 0.9 * get_gpu("h100").memory_bytes
    assert offloaded.cpu_bytes == pytest.approx(14 * cfg.num_params())


def test_suggestions_fit_and_combined_changes_when_no_single_one_does():
    cfg = preset("7b")
    plan = TrainingPlan(micro_batch=8, seq_len=4096, dp=8)
    verdict = check_fit(cfg, plan, get_gpu("a100-80gb"))
    assert not verdict.fits and not verdict.suggestions
    combined = verdict.combined
    assert combined.fits and combined.total == training_memory(cfg, combined.plan).total
    assert "ZeRO stage 3" in combined.change and "ZeRO stage 1" not in combined.change
    # A smaller model: one change is enough, and every suggestion listed really fits.
    verdict = check_fit(preset("1b"), TrainingPlan(micro_batch=8, seq_len=2048, dp=8), get_gpu("a100-80gb"))
    assert verdict.suggestions
    for s in verdict.suggestions:
        assert s.fits and training_memory(preset("1b"), s.plan).total <= verdict.usable


@pytest.mark.parametrize("changes, message", [
    (dict(tp=3), "does not divide the 32 attention heads"),
    (dict(pp=64), "exceeds the model's 32 layers"),
    (dict(sp=True), "needs tp > 1"),
    (dict(zero=4), "ZeRO stage must be"),
    (dict(micro_batch=0), "micro_batch must be at least 1"),
    (dict(recompute="some"), "recompute must be one of"),
    (dict(offload="params", zero=2), "needs ZeRO stage 3"),
    (dict(precision="fp8"), "precision must be one of"),
])
def test_impossible_plans_are_clear_errors(changes, message):
    with pytest.raises(LmforgeError, match=message):
        training_memory(preset("7b"), TrainingPlan(**changes))


def test_gqa_kv_heads_must_split_or_replicate_over_tp():
    cfg = preset("tiny", n_heads=6, n_kv_heads=3, dim=384)
    with pytest.raises(LmforgeError, match="key/value heads"):
        training_memory(cfg, TrainingPlan(tp=2, seq_len=128))
    assert training_memory(cfg, TrainingPlan(tp=6, seq_len=128)).total > 0  # 3 kv heads replicated on 6 ranks
