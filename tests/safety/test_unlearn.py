"""Unlearning objectives: NPO's loss and gradient against their closed form (plain log-softmax
log-likelihoods, not the model's chunked log-prob kernel), and ga / graddiff signs."""
import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.safety.unlearn import UnlearnObjective
from lmforge.train.examples import collate

CFG = ModelConfig(vocab_size=30, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)


def examples(n, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, answer = int(torch.randint(3, 7, (1,), generator=gen)), int(torch.randint(2, 6, (1,), generator=gen))
        ids = torch.randint(1, 30, (prompt + answer,), generator=gen).tolist()
        out.append((ids, [False] * prompt + [True] * answer))
    return out


def plain_sequence_logp(model, batch):
    logp = model(batch["tokens"]).log_softmax(-1)
    valid = batch["labels"] != -100
    picked = logp.gather(-1, torch.where(valid, batch["labels"], 0)[..., None]).squeeze(-1)
    return (picked * valid).sum(-1)


def setup(method="npo", beta=0.5):
    torch.manual_seed(0)
    model = Transformer(CFG).double()
    forget, retain = examples(6, 1), examples(6, 2)
    objective = UnlearnObjective(method, forget, retain, pad_id=0, vocab_size=30, beta=beta)
    objective.prepare_model(model)
    batch = objective.batches(3, seed=0).next_batch()
    return model, objective, batch


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_npo_at_the_reference_is_log2_with_the_gradient_of_the_answers_loglik():
    beta = 0.5
    model, objective, batch = setup("npo", beta)
    objective.retain_weight = 0.0
    loss, _ = objective.loss(model, batch)
    assert float(loss) == pytest.approx(2 / beta * math.log(2), abs=1e-12)
    ours = grads(model, loss)
    closed = grads(model, plain_sequence_logp(model, batch["forget"]).mean())  # weight 2σ(0) = 1 per example
    for name in ours:
        torch.testing.assert_close(ours[name], closed[name], rtol=1e-9, atol=1e-12)


def test_npo_away_from_the_reference_matches_its_formula():
    beta = 0.5
    model, objective, batch = setup("npo", beta)
    objective.retain_weight = 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, _ = objective.loss(model, batch)
    log_ratio = plain_sequence_logp(model, batch["forget"]) - objective.ref_logp[batch["index"]]
    expected = (2 / beta * torch.log1p(torch.exp(beta * log_ratio))).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-10)
    ours = grads(model, loss)
    closed = grads(model, expected)
    for name in ours:
        torch.testing.assert_close(ours[name], closed[name], rtol=1e-8, atol=1e-12)


def test_ga_and_graddiff_losses():
    model, objective, batch = setup("graddiff")
    loss, _ = objective.loss(model, batch)
    forget_nll = float(model(batch["forget"]["tokens"], targets=batch["forget"]["labels"]))
    retain_nll = float(model(batch["retain"]["tokens"], targets=batch["retain"]["labels"]))
    assert float(loss) == pytest.approx(retain_nll - forget_nll, rel=1e-12)
    model, objective, batch = setup("ga")
    assert "retain" not in batch
    assert float(objective.loss(model, batch)[0]) == pytest.approx(-forget_nll, rel=1e-12)


def test_bad_settings_are_refused():
    with pytest.raises(LmforgeError):
        UnlearnObjective("forget-everything", examples(2, 0), [], 0, 30)
    with pytest.raises(LmforgeError):
        UnlearnObjective("graddiff", examples(2, 0), [], 0, 30)
    assert collate(examples(2, 0), 0)["labels"].shape[0] == 2


def test_unlearn_command_runs_npo_end_to_end(tmp_path, capsys):
    import json

    from lmforge.cli import run
    from lmforge.model import save
    from lmforge.tokenizer import train_tokenizer

    facts = [{"prompt": f"Q: who wrote book {i}? A:", "answer": f" author {i}"} for i in range(8)]
    tok = train_tokenizer([json.dumps(f) for f in facts] * 5, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    save(Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                 hidden_dim=32, max_seq_len=64)), tmp_path / "model", tokenizer=tok)
    (tmp_path / "forget.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts[:4]))
    (tmp_path / "retain.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts[4:]))
    args = ["safety", "unlearn", str(tmp_path / "model"), f"unlearn.forget={tmp_path / 'forget.jsonl'}",
            f"unlearn.retain={tmp_path / 'retain.jsonl'}", f"train.out={tmp_path / 'out'}", "train.max_steps=2",
            "train.seq_len=32", "train.micro_batch=2", "train.global_batch_tokens=64", "train.device=cpu",
            "train.tensorboard=false"]
    assert run(args) == 0
    assert "forget exact match" in capsys.readouterr().out
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    (tmp_path / "bad.jsonl").write_text('{"prompt": 1}\n')
    assert run(args[:3] + [f"unlearn.forget={tmp_path / 'bad.jsonl'}"] + args[4:]) == 2
