"""A quantised checkpoint: `lmforge quantize` writes it, `lmforge.model.load` and the serving engine
read it back, and the loaded model computes exactly what the in-memory quantised model did."""
import copy
import json

import pytest
import torch

from lmforge.cli import run
from lmforge.errors import LmforgeError
from lmforge.model import load, save
from lmforge.model.quantized import Int4Linear, Int8Linear
from lmforge.model.w8a8 import W8A8Linear
from lmforge.quant.apply import quantize_model
from lmforge.quant.nf4 import LEVELS, dequantize_nf4, quantize_nf4
from lmforge.serve import EngineConfig, LLMEngine, SamplingParams
from tests.serve.helpers import tiny_model

METHODS = {"int8": {}, "rtn": {"group_size": 32}, "rtn-asym": {"group_size": 64, "asym": True}, "nf4": {},
           "gptq": {"group_size": 32, "act_order": True}, "awq": {"group_size": 32},
           "rtn-head4": {"group_size": 32, "head_bits": 4}, "smoothquant": {}}
BODY_LAYER = {"int8": Int8Linear, "smoothquant": W8A8Linear}   # the rest: Int4Linear


@pytest.mark.parametrize("label", sorted(METHODS))
def test_saved_quantised_model_loads_back_identically(tmp_path, smollm_tokenizer, label):
    method = label.split("-")[0]
    model = tiny_model(smollm_tokenizer.vocab_size, seed=5, max_seq_len=64)
    calib = torch.randint(0, smollm_tokenizer.vocab_size, (4, 32))
    quantize_model(model, method, calibration=calib, **METHODS[label])
    save(model, tmp_path / "q", tokenizer=smollm_tokenizer)
    assert json.loads((tmp_path / "q" / "lmforge_quant.json").read_text())["method"] == method
    back = load(tmp_path / "q")
    assert type(back.layers[0].mlp.up_proj) is BODY_LAYER.get(method, Int4Linear)
    head = Int4Linear if METHODS[label].get("head_bits") == 4 else W8A8Linear if method == "smoothquant" else Int8Linear
    assert isinstance(back.lm_head, head)
    assert back.layers[0].mlp.up_proj.extra_repr() == model.layers[0].mlp.up_proj.extra_repr()
    tokens = torch.randint(0, smollm_tokenizer.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), model(tokens), rtol=0, atol=0)
    # the engine decodes it (packed CPU kernels for one row at a time) like the in-memory model
    params = SamplingParams(max_tokens=6, temperature=0)
    outs = [LLMEngine(m, smollm_tokenizer, EngineConfig(num_blocks=16)).generate([[1, 2, 3]], params)[0]["token_ids"]
            for m in (model, back)]
    assert outs[0] == outs[1] and len(outs[0]) == 6


def test_nf4_checkpoint_holds_qloras_codes_and_values(smollm_tokenizer):
    model = tiny_model(smollm_tokenizer.vocab_size, seed=6, max_seq_len=64)
    w = model.layers[1].self_attn.q_proj.weight.detach().clone()
    quantize_model(model, "nf4")
    layer = model.layers[1].self_attn.q_proj
    torch.testing.assert_close(layer.codebook, LEVELS, rtol=0, atol=0)
    torch.testing.assert_close(layer.dequantized(), dequantize_nf4(quantize_nf4(w), w.shape), rtol=0, atol=1e-7)


def test_quantize_command_writes_a_checkpoint_that_generate_runs(tmp_path, smollm_tokenizer, capsys):
    model = tiny_model(smollm_tokenizer.vocab_size, seed=7, max_seq_len=64)
    save(model, tmp_path / "m", tokenizer=smollm_tokenizer)
    assert run(["quantize", str(tmp_path / "m"), "--method", "rtn", "--group-size", "32", "--asym",
                "-o", str(tmp_path / "q")]) == 0
    spec = json.loads((tmp_path / "q" / "lmforge_quant.json").read_text())
    assert spec["group_size"] == 32 and spec["asym"] is True
    assert run(["generate", str(tmp_path / "q"), "-p", "hi", "--max-tokens", "3", "--temperature", "0",
                "--device", "cpu"]) == 0
    assert run(["quantize", str(tmp_path / "m"), "--method", "rtn", "--group-size", "48", "-o",
                str(tmp_path / "bad")]) == 2
    assert "group-size" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert run(["quantize", str(tmp_path / "m"), "--method", "int8", "--head-bits", "4", "-o",
                str(tmp_path / "bad")]) == 2
    assert "--head-bits" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_corrupt_quantisation_file_is_a_clear_error(tmp_path, smollm_tokenizer):
    model = quantize_model(tiny_model(smollm_tokenizer.vocab_size, max_seq_len=64), "rtn", group_size=32)
    save(model, tmp_path / "q")
    (tmp_path / "q" / "lmforge_quant.json").write_text('{"layers": {"layers.0.nope": {"format": "int4"}}}')
    with pytest.raises(LmforgeError, match="names no module"):
        load(tmp_path / "q")
    (tmp_path / "q" / "lmforge_quant.json").write_text("{")
    with pytest.raises(LmforgeError, match="corrupt"):
        load(tmp_path / "q")


def test_quantising_twice_is_refused(smollm_tokenizer):
    model = quantize_model(tiny_model(smollm_tokenizer.vocab_size, max_seq_len=64), "int8")
    with pytest.raises(LmforgeError, match="already quantised"):
        quantize_model(copy.deepcopy(model), "rtn")


def test_quantize_command_smoothquant_records_alpha_and_refuses_one_outside_0_1(tmp_path, smollm_tokenizer):
    model = tiny_model(smollm_tokenizer.vocab_size, seed=8, max_seq_len=64)
    save(model, tmp_path / "m", tokenizer=smollm_tokenizer)
    calib = ["--calibration-samples", "2", "--calibration-len", "32"]
    assert run(["quantize", str(tmp_path / "m"), "--method", "smoothquant", "--alpha", "0.3", *calib,
                "-o", str(tmp_path / "q")]) == 0
    spec = json.loads((tmp_path / "q" / "lmforge_quant.json").read_text())
    assert spec["method"] == "smoothquant" and spec["alpha"] == 0.3
    assert isinstance(load(tmp_path / "q").layers[1].self_attn.o_proj, W8A8Linear)
    assert run(["quantize", str(tmp_path / "m"), "--method", "smoothquant", "--alpha", "1.5", *calib,
                "-o", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
