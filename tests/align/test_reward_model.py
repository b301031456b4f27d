"""Reward model: the reward is the separate scalar head applied to the last real token's hidden
state (checked against the plain LM logits of an unpadded forward of a copy whose LM-head row is
the head), the head trains and is saved/loaded, the objective's loss is the Bradley–Terry
formula, and a reward model learns held-out preferences that a shuffled-label control cannot."""
import copy
import random

import pytest
import torch
import torch.nn.functional as F

from lmforge.align.preference_data import build_pair_examples, collate_pairs
from lmforge.align.reward_model import (
    HEAD_FILE,
    RewardObjective,
    RMConfig,
    RMRecipe,
    finetune_rm,
    load_reward_model,
    sequence_rewards,
)
from lmforge.config import load_recipe
from lmforge.errors import LmforgeError
from lmforge.model import save

from .test_dpo import key_value_pairs, kv_tokenizer, tiny, write_pairs


@pytest.fixture(scope="module")
def tok():
    return kv_tokenizer()


def test_reward_is_the_scalar_head_at_the_last_real_token_and_loss_is_bradley_terry(tok):
    examples, _ = build_pair_examples(tok, key_value_pairs(random.Random(0), 5), 64, 5)
    cfg = RMConfig(margin=0.5, center_rewards=0.01)
    obj = RewardObjective(tok, examples, [], cfg, 5, tok.eos_id)
    model = obj.prepare_model(tiny(tok, dtype=torch.float64))
    head = model.reward_head
    assert isinstance(head, torch.nn.Linear) and head.weight.shape == (1, 48) and head.weight.requires_grad
    assert head.weight.dtype == torch.float64 and head.bias is None
    batch = obj.batches(5, seed=1).next_batch()  # right-padded: rows have different lengths
    assert len(set(batch["lengths"].tolist())) > 1
    loss, extra = obj.loss(model, batch)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0  # the head trains
    with torch.no_grad():
        # reference: each sequence alone, no padding, through the plain LM logits of a copy whose
        # (untied) LM-head row 7 is the reward head
        ref = copy.deepcopy(model)
        ref.lm_head.weight[7] = head.weight[0]
        rows = [batch["full"][i, :n] for i, n in enumerate(batch["lengths"].tolist())]
        expected_r = torch.stack([ref(r[None])[0, -1, 7] for r in rows])
        r = sequence_rewards(model, batch, head.weight[0])
    assert not model.cfg.tie_embeddings
    torch.testing.assert_close(r, expected_r, rtol=1e-10, atol=1e-10)
    c, j = expected_r[:5], expected_r[5:]
    expected = -F.logsigmoid(c - j - 0.5).mean() + 0.01 * ((c + j) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-10, atol=1e-10)
    assert extra["accuracy"] == pytest.approx(float((c > j).double().mean()))
    with pytest.raises(LmforgeError, match="no reward head"):
        obj.loss(tiny(tok, dtype=torch.float64), batch)


def held_out_accuracy(model_dir, tok, pairs) -> float:
    model, head = load_reward_model(model_dir)
    examples, _ = build_pair_examples(tok, pairs, 64, len(pairs))
    with torch.no_grad():
        r = sequence_rewards(model.eval(), collate_pairs(examples, tok.eos_id), head)
    n = len(examples)
    return float((r[:n] > r[n:]).float().mean())


def test_reward_model_learns_held_out_preferences_and_shuffled_control_does_not(tok, tmp_path):
    start = tmp_path / "start"
    save(tiny(tok, 0), start, tokenizer=tok)
    val_pairs = key_value_pairs(random.Random(100), 64)
    common = ["train.seq_len=16", "train.micro_batch=16", "train.global_batch_tokens=256", "train.max_steps=300",
              "train.lr=0.003", "train.warmup=0.1", "train.eval_every=300", "train.ckpt_every=300",
              "train.log_every=20", "train.tensorboard=false", "train.seed=0", "rm.max_examples=400"]
    acc = {}
    for name, shuffled in (("real", False), ("shuffled", True)):
        data = write_pairs(tmp_path / f"{name}.jsonl", key_value_pairs(random.Random(0), 400, shuffled))
        finetune_rm(load_recipe(RMRecipe, None, [*common, f"rm.data={data}", f"train.out={tmp_path / name}"]),
                    str(start))
        assert (tmp_path / name / "model" / HEAD_FILE).is_file()
        acc[name] = held_out_accuracy(tmp_path / name / "model", tok, val_pairs)
    print(f"reward model held-out accuracy: real {acc['real']:.3f}, shuffled {acc['shuffled']:.3f}")
    assert acc["real"] > 0.9
    assert abs(acc["shuffled"] - 0.5) < 0.2
