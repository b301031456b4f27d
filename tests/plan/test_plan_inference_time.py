import pytest

from lmforge.errors import LmforgeError
from lmforge.model.config import preset
from lmforge.plan import decode_bound, get_gpu, inference_memory, max_batch, resolve_model, training_time
from lmforge.plan.inference import WEIGHT_BYTES

LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}


def test_weights_and_kv_cache_scale_as_expected():
    cfg = preset("7b")
    e = inference_memory(cfg, batch=1, seq_len=4096)
    assert e.weights == 2 * cfg.num_params()
    assert e.kv_per_token == 2 * 32 * 4096 * 2        # K and V, 32 layers, 4096 wide, bf16
    assert e.kv_cache == e.kv_per_token * 4096        # 2.1 GB per 4k-token sequence
    e8 = inference_memory(cfg, batch=8, seq_len=4096)
    assert e8.kv_cache == 8 * e.kv_cache and e8.weights == e.weights
    int4 = inference_memory(cfg, batch=1, seq_len=4096, weights="int4", kv="fp8")
    assert int4.weights == pytest.approx(cfg.num_params() * (0.5 + 2 / 128))
    assert int4.kv_cache == e.kv_cache / 2


def test_gqa_and_tensor_parallel_split_the_cache():
    gqa = resolve_model(LLAMA3_8B)   # 8 KV heads
    mha = resolve_model({**LLAMA3_8B, "num_key_value_heads": 32})
    assert inference_memory(mha, 4, 8192).kv_cache == 4 * inference_memory(gqa, 4, 8192).kv_cache
    one, two = inference_memory(gqa, 4, 8192), inference_memory(gqa, 4, 8192, tp=2)
    assert two.weights == one.weights / 2 and two.kv_cache == one.kv_cache / 2
    # With more ranks than KV heads the heads are replicated: the cache per GPU stops shrinking.
    assert inference_memory(gqa, 4, 8192, tp=16).kv_cache == inference_memory(gqa, 4, 8192, tp=8).kv_cache


def test_max_batch_is_the_largest_that_fits():
    cfg, budget = preset("7b"), 0.9 * get_gpu("a100-80gb").memory_bytes
    b = max_batch(cfg, budget, 4096)
    assert b > 0
    assert inference_memory(cfg, b, 4096).total <= budget < inference_memory(cfg, b + 1, 4096).total
    assert max_batch(cfg, 1e9, 4096) == 0   # weights alone do not fit in 1 GB


def test_inference_errors():
    with pytest.raises(LmforgeError, match="unknown weight precision 'int3'"):
        inference_memory(preset("7b"), weights="int3")
    with pytest.raises(LmforgeError, match="does not divide"):
        inference_memory(preset("7b"), tp=3)
    assert set(WEIGHT_BYTES) >= {"bf16", "fp8", "int8", "int4"}


def test_training_time_and_cost():
    # Chinchilla: 70B params x 1.4T tokens = 5.88e23 FLOPs.
    t = training_time(70e9, 1.4e12, gpus=1024, peak_flops=312e12, mfu=0.45, price_per_gpu_hour=2.0)
    assert t.total_flops == pytest.approx(5.88e23)
    assert t.seconds == pytest.approx(5.88e23 / (1024 * 312e12 * 0.45))
    assert t.gpu_hours == pytest.approx(1024 * t.seconds / 3600) and t.cost == pytest.approx(2 * t.gpu_hours)
    # Doubling GPUs halves wall-clock but not GPU-hours; attention FLOPs per token can replace 6N.
    t2 = training_time(70e9, 1.4e12, gpus=2048, peak_flops=312e12, mfu=0.45)
    assert t2.days == pytest.approx(t.days / 2) and t2.gpu_hours == pytest.approx(t.gpu_hours) and t2.cost is None
    cfg = preset("7b")
    with_attention = training_time(cfg.num_params(), 1e12, 64, 989e12, flops_per_token=cfg.flops_per_token(4096))
    assert with_attention.total_flops == cfg.flops_per_token(4096) * 1e12


@pytest.mark.parametrize("kwargs, message", [
    (dict(mfu=0), "MFU"), (dict(mfu=1.2), "MFU"), (dict(gpus=0), "gpus"), (dict(tokens=-1), "tokens"),
    (dict(price_per_gpu_hour=-1), "negative"),
])
def test_training_time_errors(kwargs, message):
    args = dict(n_params=7e9, tokens=1e12, gpus=8, peak_flops=989e12) | kwargs
    with pytest.raises(LmforgeError, match=message):
        training_time(**args)


def test_decode_floor_is_the_weights_and_kv_read_at_the_data_sheet_bandwidth():
    cfg, h100 = preset("7b"), get_gpu("h100")   # Llama-2-7B shapes, untied head
    d, layer = 4096, 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    weights = 2 * (32 * layer + d + 32000 * d)        # bf16, the head included, the embedding table not
    kv = 2 * 32 * 4096 * 2 * 4096                     # one sequence's K and V at 4096 tokens, bf16
    b = decode_bound(cfg, 1, 4096, h100.bandwidth, h100.peak_flops)
    assert b.memory_bound and b.weight_bytes == weights and b.kv_bytes == kv
    assert b.seconds == pytest.approx((weights + kv) / 3.35e12)
    assert 200 < b.tokens_per_s < 250                 # the folk figure: ~13.5 GB per token at 3.35 TB/s
    int4 = decode_bound(cfg, 1, 4096, h100.bandwidth, h100.peak_flops, weights="int4")
    assert int4.weight_bytes == pytest.approx(weights / 2 * (0.5 + 2 / 128))


def test_decode_turns_compute_bound_at_the_ridge_batch():
    # bf16 weights, 2 FLOPs per weight per sequence: the ridge is peak / bandwidth ~ 295 sequences on
    # an H100 (short context, so K/V reads do not matter)
    cfg, h100 = preset("7b"), get_gpu("h100")
    assert decode_bound(cfg, 280, 1, h100.bandwidth, h100.peak_flops).memory_bound
    high = decode_bound(cfg, 310, 1, h100.bandwidth, h100.peak_flops)
    assert not high.memory_bound and high.seconds == pytest.approx(high.flops / h100.peak_flops)


def test_decode_reads_the_tied_head_and_the_routed_experts():
    tied = preset("125m")
    assert decode_bound(tied, 1, 1, 1e12, 1e15).weight_bytes == 2 * tied.num_params()   # table read once, as the head
    moe = resolve_model({**LLAMA3_8B, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2})
    expert = 3 * 4096 * 14336
    one = decode_bound(moe, 1, 1, 1e12, 1e15)
    many = decode_bound(moe, 4096, 1, 1e12, 1e15)
    assert many.weight_bytes - one.weight_bytes == pytest.approx(2 * 32 * 6 * expert)   # 2 of 8 -> all 8
    with pytest.raises(LmforgeError, match="at least 1"):
        decode_bound(moe, 0, 1, 1e12, 1e15)
