"""train.z_loss reaches the loss the trainer optimises: with lr = 0 the logged step-1 loss equals
cross-entropy + z_loss * mean(logsumexp(logits)^2) computed here from full logits."""
import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import load_recipe
from lmforge.data.shards import TokenShards
from lmforge.errors import LmforgeError
from lmforge.model import load
from lmforge.train.config import TrainConfig, TrainRecipe
from lmforge.train.loader import ShardLoader
from lmforge.train.trainer import train

MODEL = ["model.preset=tiny", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
         "model.hidden_dim=64", "model.max_seq_len=32", "model.qk_norm=true", "model.logit_softcap=5"]


def test_logged_loss_includes_the_z_loss_term(toy_shards, tmp_path):
    coef = 0.5
    out = tmp_path / "run"
    train(load_recipe(TrainRecipe, None, MODEL + [
        f"train.data={toy_shards}", f"train.out={out}", "train.seq_len=16", "train.micro_batch=4",
        "train.global_batch_tokens=128", "train.max_steps=1", "train.lr=0", "train.log_every=1",
        "train.tensorboard=false", f"train.z_loss={coef}", "train.seed=3"]))
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")][0]["loss"]
    model = load(out / "model", dtype=torch.float64)  # lr = 0: the weights the step was taken at
    assert model.cfg.qk_norm and model.cfg.logit_softcap == 5
    loader = ShardLoader(TokenShards(toy_shards, "train"), 16, 4, 3)
    batch = torch.cat([loader.next_batch() for _ in range(2)])   # the step's two micro-batches
    with torch.no_grad():
        logits = model(batch[:, :-1]).reshape(-1, model.cfg.vocab_size)
    ce = F.cross_entropy(logits, batch[:, 1:].reshape(-1))
    ref = ce + coef * torch.logsumexp(logits, -1).square().mean()
    assert float(ref - ce) > 0.1
    assert logged == pytest.approx(float(ref), abs=1e-4)


def test_negative_z_loss_is_refused():
    with pytest.raises(LmforgeError, match="z_loss"):
        TrainConfig(z_loss=-1e-4)
