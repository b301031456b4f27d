import json

import pytest

from lmforge.errors import LmforgeError
from lmforge.model.config import preset
from lmforge.plan import kv_cache_bytes_per_token, resolve_model, summarize

LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False}
MIXTRAL_8X7B = {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768}


def test_hf_configs_give_the_published_parameter_counts():
    # Meta's and Mistral's model cards: Llama-3-8B has 8.03B parameters, Mixtral-8x7B 46.7B (12.9B active).
    llama = summarize(resolve_model(LLAMA3_8B))
    assert llama.total_params == 8_030_261_248
    mixtral = summarize(resolve_model(MIXTRAL_8X7B))
    assert mixtral.total_params == 46_702_792_704
    assert mixtral.active_params == pytest.approx(12.9e9, rel=0.01)
    assert mixtral.active_params < mixtral.total_params


def test_gqa_shrinks_the_kv_cache_by_the_head_ratio():
    cfg = resolve_model(LLAMA3_8B)
    assert kv_cache_bytes_per_token(cfg, 2) == 2 * 32 * 8 * 128 * 2 == 128 * 1024  # 128 KiB per token
    mha = resolve_model({**LLAMA3_8B, "num_key_value_heads": 32})
    assert kv_cache_bytes_per_token(mha) == 4 * kv_cache_bytes_per_token(cfg)


def test_flops_per_token_is_6n_plus_the_attention_term():
    cfg = preset("1b")
    s = summarize(cfg, seq_len=2048)
    assert s.flops_per_token == cfg.flops_per_token(2048)
    # 6N counts every matmul weight a token passes through, the LM head included, not the embedding lookup.
    assert s.dense_flops_per_token == 6 * (cfg.num_params() - cfg.vocab_size * cfg.dim)
    assert s.attention_flops_per_token == 6 * 40 * 2048 * 2048
    assert summarize(cfg, seq_len=4096).attention_flops_per_token == 2 * s.attention_flops_per_token


def test_moe_flops_count_only_the_active_experts():
    moe = preset("tiny-moe")
    dense_equivalent = preset("tiny-moe", n_experts=0)
    s = summarize(moe)
    # top-2 of 4 experts: the MLP FLOPs are twice a single expert's, plus the router.
    router = moe.n_layers * moe.dim * moe.n_experts
    assert s.active_params == dense_equivalent.num_params() + moe.n_layers * 3 * moe.dim * moe.hidden_dim + router
    assert s.total_params - s.active_params == moe.n_layers * 2 * 3 * moe.dim * moe.hidden_dim


def test_resolve_model_reads_files_and_directories(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert resolve_model(tmp_path).num_params() == 8_030_261_248
    assert resolve_model(str(tmp_path / "config.json")).n_kv_heads == 8
    assert resolve_model("7b").num_params() == preset("7b").num_params()


def test_resolve_model_errors_are_clear(tmp_path):
    with pytest.raises(LmforgeError, match="neither a preset"):
        resolve_model("no-such-model")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LmforgeError, match="not a readable JSON"):
        resolve_model(bad)
    with pytest.raises(LmforgeError, match="cannot plan model_type 'gpt2'"):
        resolve_model({"model_type": "gpt2", "hidden_size": 768})
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(LmforgeError, match="lacks vocab_size, num_hidden_layers"):
        resolve_model(incomplete)
