"""Reward model: the reward is the head applied to the last real token's hidden state (checked
against the plain LM logits of an unpadded forward), the objective's loss is the Bradley–Terry
formula, and a reward model learns held-out preferences that a shuffled-label control cannot."""
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


def test_reward_is_the_head_token_logit_at_the_last_real_token_and_loss_is_bradley_terry(tok):
    model = tiny(tok, dtype=torch.float64)
    examples, _ = build_pair_examples(tok, key_value_pairs(random.Random(0), 5), 64, 5)
    cfg = RMConfig(margin=0.5, center_rewards=0.01, head_token=7)
    obj = RewardObjective(tok, examples, [], cfg, 5, tok.eos_id)
    batch = obj.batches(5, seed=1).next_batch()  # right-padded: rows have different lengths
    assert len(set(batch["lengths"].tolist())) > 1
    loss, extra = obj.loss(model, batch)
    with torch.no_grad():
        # reference: each sequence alone, no padding; the head row's logit at its last token
        rows = [batch["full"][i, :n] for i, n in enumerate(batch["lengths"].tolist())]
        expected_r = torch.stack([model(r[None])[0, -1, 7] for r in rows])
        r = sequence_rewards(model, batch, model.lm_head.weight[7])
    torch.testing.assert_close(r, expected_r, rtol=1e-10, atol=1e-10)
    c, j = expected_r[:5], expected_r[5:]
    expected = -F.logsigmoid(c - j - 0.5).mean() + 0.01 * ((c + j) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-10, atol=1e-10)
    assert extra["accuracy"] == pytest.approx(float((c > j).double().mean()))
    with pytest.raises(LmforgeError, match="head_token"):
        RewardObjective(tok, examples, [], RMConfig(head_token=10**6), 5, tok.eos_id).loss(model, batch)


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
