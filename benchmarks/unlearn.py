"""Mini-TOFU: fictitious facts finetuned into a small model, then unlearned.

40 generated facts ("Q: Where was <invented name> born? A: <invented city>.") train a 2-layer
lmforge model until it answers all of them; 8 are the forget set, 32 the retain set. A model
retrained from scratch on the retain set alone is the target. Starting from the full model,
gradient ascent, gradient difference and NPO each run the same number of steps; reported: forget and
retain exact match (greedy answer tokens), and TOFU's forget quality: the KS-test p-value between
the forget answers' per-token NLL under the unlearned model and under the retrained one (high =
indistinguishable from never having seen them).

    PYTHONPATH=src python benchmarks/unlearn.py [--steps 60]
"""
from __future__ import annotations

import argparse
import random

import torch
from scipy.stats import ks_2samp

from lmforge.model import ModelConfig, Transformer
from lmforge.safety.unlearn import UnlearnObjective
from lmforge.train.examples import collate
from lmforge.tokenizer import train_tokenizer

SYLLABLES = ["ka", "ro", "mi", "ten", "sha", "vel", "or", "lu", "zan", "pe", "qui", "dor", "ba", "nix", "ul"]


def facts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    word = lambda k: "".join(rng.choice(SYLLABLES) for _ in range(k)).capitalize()
    return [(f"Q: Where was {word(2)} {word(3)} born? A:", f" {word(3)}.") for _ in range(n)]


def encode(tok, pairs):
    out = []
    for prompt, answer in pairs:
        p, a = tok.encode(prompt), tok.encode(answer)
        out.append((p + a, [False] * len(p) + [True] * len(a)))
    return out


def answer_nll(model, examples) -> torch.Tensor:
    batch = collate(examples, 0)
    with torch.no_grad():
        logp = model.token_logprobs(batch["tokens"], batch["labels"])
    n = (batch["labels"] != -100).sum(-1)
    return -logp.sum(-1) / n


def exact_match(model, examples) -> float:
    batch = collate(examples, 0)
    with torch.no_grad():
        pred = model(batch["tokens"]).argmax(-1)
    ok = (pred == batch["labels"]) | (batch["labels"] == -100)
    return float(ok.all(-1).float().mean())


def train(model, examples, steps, lr=3e-3, seed=0):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = random.Random(seed)
    for _ in range(steps):
        batch = collate(gen.sample(examples, min(16, len(examples))), 0)
        loss = model(batch["tokens"], targets=batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pairs = facts(40)
    tok = train_tokenizer([p + a for p, a in pairs] * 3, vocab_size=400, min_frequency=1)
    data = encode(tok, pairs)
    forget, retain = data[:8], data[8:]
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=96, n_layers=2, n_heads=4, hidden_dim=256, max_seq_len=64)
    torch.manual_seed(0)
    full = train(Transformer(cfg), data, args.train_steps)
    torch.manual_seed(0)
    retrained = train(Transformer(cfg), retain, args.train_steps)
    target_nll = answer_nll(retrained, forget)
    rows = [("full", full), ("retrained", retrained)]
    for method in ("ga", "graddiff", "npo"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        model.load_state_dict(full.state_dict())
        objective = UnlearnObjective(method, forget, retain, 0, tok.vocab_size, beta=0.1)
        objective.prepare_model(model)
        loader = objective.batches(4, seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        for _ in range(args.steps):
            loss, _ = objective.loss(model, loader.next_batch())
            opt.zero_grad()
            loss.backward()
            opt.step()
        rows.append((method, model))
    print(f"{'model':<10} {'forget EM':>9} {'retain EM':>9} {'forget NLL':>10} {'KS p vs retrained':>17}")
    for name, model in rows:
        nll = answer_nll(model, forget)
        p = ks_2samp(nll.numpy(), target_nll.numpy()).pvalue
        print(f"{name:<10} {exact_match(model, forget):>9.2f} {exact_match(model, retain):>9.2f} "
              f"{float(nll.mean()):>10.2f} {p:>17.3g}")


if __name__ == "__main__":
    main()
