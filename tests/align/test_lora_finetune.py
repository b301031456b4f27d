"""LoRA / QLoRA through the training loop (`lora.r > 0` in a finetune recipe): only the adapters
train (every base weight is bit-for-bit the start's), the merged train.out/model equals the start +
the saved PEFT adapter (loaded with load_adapter) to 1e-5, checkpoints hold the adapters alone and a
Ctrl-C + `lmforge finetune sft --resume` run equals an uninterrupted one bit for bit; DPO with LoRA
scores its reference with the adapters off (no cache); the reward model's head trains beside them."""
import itertools
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lmforge.align.cli import RECIPES
from lmforge.align.data import stdlib_chats
from lmforge.align.dpo import REFERENCE_FILE, DPORecipe, finetune_dpo
from lmforge.align.finetune_config import ADAPTER_DIR, LoraSettings
from lmforge.align.lora import load_adapter, lora_layers
from lmforge.align.reward_model import (
    HEAD_FILE,
    RewardObjective,
    RMRecipe,
    finetune_rm,
    load_reward_model,
)
from lmforge.align.sft import SFTObjective, SFTRecipe, finetune_sft
from lmforge.config import load_recipe
from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer, load, save
from lmforge.tokenizer import train_tokenizer
from lmforge.train.checkpoint import TRAINABLE_FILE, latest_checkpoint
from lmforge.train.metrics import read_metrics

from .test_dpo import key_value_pairs, kv_tokenizer, tiny, write_pairs
from .test_sft import RESUME

LORA = ["lora.r=4", "lora.alpha=8", "lora.target_modules=[q_proj,v_proj,down_proj]"]
RUN = [*RESUME, *LORA, "train.max_steps=8", "train.ckpt_every=100", "train.eval_every=100", "train.lr=0.01"]
TARGETS = (".q_proj.weight", ".v_proj.weight", ".down_proj.weight")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny chat model (random weights, a ChatML tokenizer trained on the default SFT data)."""
    chats = list(itertools.islice(stdlib_chats("train"), 300))
    tok = train_tokenizer([m["content"] for c in chats for m in c], vocab_size=700, min_frequency=1)
    torch.manual_seed(0)
    net = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                  hidden_dim=64, max_seq_len=128))
    path = tmp_path_factory.mktemp("tiny") / "model"
    save(net, path, tokenizer=tok)
    return path


def sft(out, model, *extra, resume=False):
    """The command's default recipe (sft-tiny.yaml) under RUN, in-process, as `lmforge finetune sft` runs it."""
    return finetune_sft(load_recipe(SFTRecipe, RECIPES / "sft-tiny.yaml", [*RUN, *extra, f"train.out={out}"]), str(model), resume=resume)


def test_lora_settings_are_validated():
    for bad, match in (({"r": -1}, "lora.r"), ({"r": 4, "alpha": 0.0}, "lora.alpha"), ({"dropout": 1.0}, "lora.dropout"),
                       ({"target_modules": []}, "lora.target_modules"), ({"r": 4, "quantize_base": "int8"}, "quantize"),
                       ({"quantize_base": "nf4"}, "lora.quantize_base")):
        with pytest.raises(LmforgeError, match=match):
            LoraSettings(**bad)
    with pytest.raises(LmforgeError, match="lora.r must be int"):
        load_recipe(SFTRecipe, None, ["lora.r=four"])


def test_sft_lora_trains_adapters_only_and_merged_equals_base_plus_adapter(tiny_model, tmp_path):
    sft(tmp_path / "run", tiny_model)
    start = load(tiny_model).state_dict()
    merged = load(tmp_path / "run" / "model").state_dict()
    for name, w in start.items():
        if name.endswith(TARGETS):
            assert not torch.equal(merged[name], w), f"{name}: the adapter did not change it"
        else:  # embeddings, norms, the LM head, untargeted projections: frozen, bit for bit
            assert torch.equal(merged[name], w), f"{name} changed: the base is not frozen"
    # the adapter folder (PEFT layout) on the untouched start = the merged model
    adapted = load_adapter(load(tiny_model), tmp_path / "run" / ADAPTER_DIR).eval()
    assert all(float(layer.lora_B.weight.detach().abs().max()) > 0 for layer in lora_layers(adapted).values())
    assert all(torch.equal(adapted.get_parameter(f"{n}.base_layer.weight"), start[f"{n}.weight"])
               for n in lora_layers(adapted))
    ids = torch.randint(0, adapted.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "run" / "model").eval()(ids), adapted(ids), rtol=0, atol=1e-5)
    # checkpoints hold the adapters only (the base comes from init_from)
    ckpt = latest_checkpoint(tmp_path / "run" / "ckpt")
    keys = set(load_file(ckpt / TRAINABLE_FILE))
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys) and len(keys) == 2 * 3 * 2
    assert not (ckpt / "model.safetensors").exists()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]


def test_sft_lora_ctrl_c_then_cli_resume_is_bitwise_exact(tiny_model, tmp_path, monkeypatch):
    sft(tmp_path / "ref", tiny_model)
    calls = {"n": 0}
    real_loss = SFTObjective.loss

    def interrupting_loss(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 2 * 5 + 1:  # grad accum 2: the 1st micro-batch of step 6
            raise KeyboardInterrupt
        return real_loss(self, model, batch)

    monkeypatch.setattr(SFTObjective, "loss", interrupting_loss)
    with pytest.raises(KeyboardInterrupt):
        sft(tmp_path / "cut", tiny_model)
    assert latest_checkpoint(tmp_path / "cut" / "ckpt").name == "step_000005"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "lmforge", "finetune", "sft", str(tiny_model), "--resume", *RUN,
           f"train.out={tmp_path / 'cut'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from step 5" in done.stdout
    for sub, file in (("model", "model.safetensors"), (ADAPTER_DIR, "adapter_model.safetensors")):
        ours, want = load_file(tmp_path / "cut" / sub / file), load_file(tmp_path / "ref" / sub / file)
        assert set(ours) == set(want) and all(torch.equal(ours[k], want[k]) for k in want), sub


def test_resume_refuses_a_checkpoint_of_other_lora_settings(tiny_model, tmp_path):
    sft(tmp_path / "run", tiny_model, "train.max_steps=2", "train.ckpt_every=1")
    with pytest.raises(LmforgeError, match="trainable weights differ"):
        sft(tmp_path / "run", tiny_model, "train.max_steps=3", "lora.target_modules=[q_proj]", resume=True)
    with pytest.raises(LmforgeError, match="trainable weights differ"):
        sft(tmp_path / "run", tiny_model, "train.max_steps=3", "lora.r=0", resume=True)


def test_qlora_sft_runs_and_merges_the_dequantised_base(tiny_model, tmp_path):
    sft(tmp_path / "q", tiny_model, "lora.quantize_base=nf4", "train.max_steps=3")
    adapted = load_adapter(load(tiny_model), tmp_path / "q" / ADAPTER_DIR, quantize_base="nf4").eval()
    ids = torch.randint(0, adapted.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "q" / "model").eval()(ids), adapted(ids), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def kv(tmp_path_factory):
    tok = kv_tokenizer()
    path = tmp_path_factory.mktemp("kv")
    save(tiny(tok, 0), path / "start", tokenizer=tok)
    return tok, path / "start", write_pairs(path / "pairs.jsonl", key_value_pairs(random.Random(0), 64))


PAIRS = ["train.seq_len=16", "train.micro_batch=8", "train.global_batch_tokens=128", "train.max_steps=6",
         "train.lr=0.01", "train.log_every=1", "train.eval_every=100", "train.ckpt_every=100",
         "train.tensorboard=false", *LORA]


def test_dpo_with_lora_uses_the_base_as_reference_without_a_cache(kv, tmp_path):
    _, start, data = kv
    out = tmp_path / "dpo"
    finetune_dpo(load_recipe(DPORecipe, None, [*PAIRS, f"dpo.data={data}", f"train.out={out}"]), str(start))
    assert not (out / REFERENCE_FILE).exists()
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    # step 1: the adapters are zero, policy == reference, so the sigmoid loss is -log sigmoid(0)
    assert rows[0]["loss"] == pytest.approx(float(torch.log(torch.tensor(2.0, dtype=torch.float64))), abs=1e-6)
    assert rows[0]["reward_margin"] == 0.0 and rows[-1]["reward_margin"] != 0.0
    load_adapter(load(start), out / ADAPTER_DIR)


def test_reward_model_with_lora_trains_its_head_and_checkpoints_it(kv, tmp_path):
    _, start, data = kv
    out = tmp_path / "rm"
    finetune_rm(load_recipe(RMRecipe, None, [*PAIRS, "train.ckpt_every=3", f"rm.data={data}", f"train.out={out}"]),
                str(start))
    keys = set(load_file(latest_checkpoint(out / "ckpt") / TRAINABLE_FILE))
    assert "reward_head.weight" in keys and all("lora_" in k for k in keys - {"reward_head.weight"})
    model, head = load_reward_model(out / "model")
    assert head.shape == (48,)
    assert torch.equal(load_file(out / "model" / HEAD_FILE)["weight"][0], head)
    assert "reward_head.weight" not in model.state_dict()
    load_adapter(load(start), out / ADAPTER_DIR)


def test_reward_model_ctrl_c_and_resume_restores_its_head_bitwise(kv, tmp_path, monkeypatch):
    """Full finetune (lora.r=0) + the head: the checkpoint holds every weight and the head, by name."""
    _, start, data = kv
    args = [*PAIRS, "lora.r=0", f"rm.data={data}"]
    finetune_rm(load_recipe(RMRecipe, None, [*args, f"train.out={tmp_path / 'ref'}"]), str(start))
    calls = {"n": 0}
    real_loss = RewardObjective.loss

    def interrupting_loss(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # grad accum 1: step 5's batch
            raise KeyboardInterrupt
        return real_loss(self, model, batch)

    monkeypatch.setattr(RewardObjective, "loss", interrupting_loss)
    with pytest.raises(KeyboardInterrupt):
        finetune_rm(load_recipe(RMRecipe, None, [*args, f"train.out={tmp_path / 'cut'}"]), str(start))
    assert "reward_head.weight" in load_file(latest_checkpoint(tmp_path / "cut" / "ckpt") / TRAINABLE_FILE)
    monkeypatch.setattr(RewardObjective, "loss", real_loss)
    finetune_rm(load_recipe(RMRecipe, None, [*args, f"train.out={tmp_path / 'cut'}"]), str(start), resume=True)
    for file in ("model.safetensors", HEAD_FILE):
        ours, want = load_file(tmp_path / "cut" / "model" / file), load_file(tmp_path / "ref" / "model" / file)
        assert set(ours) == set(want) and all(torch.equal(ours[k], want[k]) for k in want), file
