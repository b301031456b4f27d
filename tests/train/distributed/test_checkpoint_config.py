"""A DCP checkpoint written before a ModelConfig field existed (its lmforge_model.json lacks the key)
still loads when the recipe leaves that field at its default; a real difference is refused."""
import json

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.train.distributed.checkpoint import load_dcp_checkpoint, save_dcp_checkpoint

CFG = dict(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)


def model_and_optimizer(**extra):
    model = Transformer(ModelConfig(**CFG, **extra))
    return model, torch.optim.AdamW(model.parameters())


def test_checkpoint_from_before_a_config_field_loads_and_a_changed_config_is_refused(tmp_path):
    torch.manual_seed(0)
    saved_model, saved_opt = model_and_optimizer()
    step = save_dcp_checkpoint(tmp_path, 3, saved_model, saved_opt, {"tokens_seen": 7}, keep_last=1)
    config = json.loads((step / "lmforge_model.json").read_text())
    for newer in ("attention", "attention_block"):  # as an older lmforge wrote it
        del config[newer]
    (step / "lmforge_model.json").write_text(json.dumps(config))

    torch.manual_seed(1)
    model, opt = model_and_optimizer()
    assert load_dcp_checkpoint(step, model, opt) == {"step": 3, "tokens_seen": 7}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved_model.state_dict().values()))

    with pytest.raises(LmforgeError, match="config differs"):
        load_dcp_checkpoint(step, *model_and_optimizer(rope_theta=500000.0))
