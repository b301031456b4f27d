"""A Hugging Face config.json that lmforge cannot honour is refused, not loaded as if plain."""
import json

import pytest

from lmforge.errors import LmforgeError
from lmforge.model import load
from lmforge.model.hf import config_from_hf

BASE = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 128, "rope_theta": 10000.0}


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
     "rope_scaling type 'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "made-up"}}, "rope_scaling type 'made-up'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}}, "rope_scaling type 'longrope'"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor"),
    ({"rms_norm_eps": -1e-6}, "norm_eps"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_unsupported_hf_configs_are_refused(change, message):
    hf = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(LmforgeError) as err:
        config_from_hf(hf)
    assert message in str(err.value)


@pytest.mark.parametrize("change", [
    {}, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
])
def test_supported_hf_configs_load(change):
    cfg = config_from_hf({**BASE, **change})
    assert (cfg.dim, cfg.n_kv_heads) == (64, 2)


def test_loading_a_gelu_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "hidden_act": "gelu"}))
    with pytest.raises(LmforgeError, match="hidden_act"):
        load(tmp_path)
