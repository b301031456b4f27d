"""The inverse-CDF draw behind every sampled token: frequencies match the probabilities (chi-square),
tokens of probability 0 are never drawn, and the engine's batched sampler gives each request the
tokens and log-probs it gets row by row (same generator, same uniform)."""
import torch
from scipy.stats import chisquare

from lmforge.model.sampling import draw
from lmforge.serve import SamplingParams, sampler
from lmforge.serve.sequence import Sequence


def test_draw_frequencies_match_the_probabilities_and_skip_zero_mass():
    probs = torch.tensor([0.0, 0.1, 0.0, 0.25, 0.05, 0.6, 0.0])
    n = 20_000
    g = torch.Generator().manual_seed(0)
    ids = draw(probs.expand(n, -1), torch.rand(n, generator=g))
    counts = torch.bincount(ids, minlength=len(probs))
    assert counts[probs == 0].sum() == 0
    kept = probs > 0
    assert chisquare(counts[kept].numpy(), (probs[kept] * n).numpy()).pvalue > 1e-3
    edge = draw(torch.tensor([[0.3, 0.7, 0.0]]), torch.tensor([1.0 - 2**-24]))  # u x total may round up
    assert edge.tolist() == [1]


def test_batched_sampler_equals_row_by_row(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    params = [SamplingParams(temperature=1.0, seed=1, logprobs=0), SamplingParams(temperature=0.7, top_k=5, seed=2),
              SamplingParams(temperature=1.3, top_p=0.8, seed=3, logprobs=2), SamplingParams(temperature=0),
              SamplingParams(temperature=1e-300, seed=4), SamplingParams(temperature=1.0, seed=5)]

    def run():
        seqs = [Sequence(f"r{i}", [1], p, torch.Generator().manual_seed(p.seed) if p.seed else None)
                for i, p in enumerate(params)]
        return [sampler.choose_tokens(logits, seqs, torch.Generator().manual_seed(9)) for _ in range(3)]
    batched = run()
    monkeypatch.setattr(sampler, "_plain", lambda seq: False)
    assert batched == run()
