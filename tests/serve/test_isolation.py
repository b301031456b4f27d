"""One request can never poison the batch it shares: degenerate sampling settings decode as their
greedy limit, and a request whose sampling raises fails alone (a JSON error, or an error event and
[DONE] in its stream) while every other request finishes exactly as it would have alone."""
import asyncio
import json

import httpx
import pytest

from lmforge.model.sampling import generate
from lmforge.serve import EngineConfig, LLMEngine, SamplingParams, sampler
from tests.serve.helpers import RunningServer

POISON_SEED = 666_666


@pytest.fixture
def poisoned(monkeypatch):
    """Sampling raises for requests seeded POISON_SEED once they have produced two tokens (they are
    sampled row by row, the others in the batched path)."""
    real, real_plain = sampler._pick, sampler._plain
    monkeypatch.setattr(sampler, "_plain", lambda seq: seq.params.seed != POISON_SEED and real_plain(seq))

    def pick(row, seq, generator):
        if seq.params.seed == POISON_SEED and seq.num_output_tokens >= 2:
            raise RuntimeError("poisoned row")
        return real(row, seq, generator)
    monkeypatch.setattr(sampler, "_pick", pick)


def test_degenerate_settings_in_a_batch_decode_greedily(tiny, smollm_tokenizer):
    """top_p 0 and vanishing temperatures (which overflow logits/T) give the reference greedy tokens."""
    prompts = [[10, 20, 30], [7, 8, 9, 10], [400, 500], [42], [3, 4]]
    reference = [list(generate(tiny, p, max_new_tokens=8, temperature=0)) for p in prompts]
    params = [SamplingParams(max_tokens=8, top_p=0.0, ignore_eos=True, seed=1),
              SamplingParams(max_tokens=8, temperature=1e-300, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=1e-38, top_p=0.5, top_k=3, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=5e-324, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=8, top_p=1e-300, seed=2, ignore_eos=True)]   # rounds to 0 in float32
    engine = LLMEngine(tiny, smollm_tokenizer, EngineConfig(num_blocks=64))
    results = engine.generate(prompts, params)
    assert [r["token_ids"] for r in results] == reference
    assert [r["finish_reason"] for r in results] == ["length"] * 5
    assert all(lp.logprob <= 0 for lp in results[3]["logprobs"])


def test_a_failing_sequence_fails_alone(tiny, smollm_tokenizer, poisoned):
    prompts = [[10, 20, 30], [7, 8, 9, 10], [11, 12], [400, 500, 600, 700]]
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=1.0, seed=POISON_SEED, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.7, presence_penalty=0.5, seed=9, ignore_eos=True)]
    config = EngineConfig(num_blocks=64)
    alone = [LLMEngine(tiny, smollm_tokenizer, config).generate([p], [sp])[0]
             for p, sp in zip(prompts, params) if sp.seed != POISON_SEED]
    engine = LLMEngine(tiny, smollm_tokenizer, config)
    batched = engine.generate(prompts, params)
    bad = batched.pop(2)
    assert bad["finish_reason"] == "error" and "poisoned row" in bad["error"] and len(bad["token_ids"]) == 2
    assert [(r["token_ids"], r["text"], r["finish_reason"]) for r in batched] == \
           [(r["token_ids"], r["text"], r["finish_reason"]) for r in alone]
    assert engine.blocks.num_used == 0 and not engine.seqs and not engine.has_work


def _events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


async def _mixed_requests(url: str, poison: bool) -> list:
    """Three well-formed requests, plus (if poison) a streamed and a plain poisoned one, all at once."""
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 10,
            "temperature": 0.8, "seed": 3}
    comp = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 10, "temperature": 0}
    bodies = [("/v1/chat/completions", {**chat, "stream": True}), ("/v1/chat/completions", chat),
              ("/v1/completions", {**comp, "stream": True})]
    if poison:
        bad = {**chat, "seed": POISON_SEED}
        bodies += [("/v1/chat/completions", {**bad, "stream": True}), ("/v1/completions", {**comp, **bad})]
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        async def one(path, body):
            r = await http.post(path, json=body)
            return r.status_code, r.text
        return await asyncio.gather(*(one(p, b) for p, b in bodies))


def _content(text: str):
    """A response without what differs between identical requests (ids, times, prefix-cache hits)."""
    def clean(obj: dict) -> dict:
        obj = {k: v for k, v in obj.items() if k not in ("id", "created")}
        if obj.get("usage"):
            obj["usage"] = {k: v for k, v in obj["usage"].items() if k != "prompt_tokens_details"}
        return obj
    if text.startswith("data:"):
        return [clean(json.loads(e)) for e in _events(text)[:-1]] + _events(text)[-1:]
    return clean(json.loads(text))


def test_poisoned_requests_over_http(tiny, smollm_tokenizer, poisoned):
    with RunningServer(tiny, smollm_tokenizer, "tiny", EngineConfig(kv_cache_mb=16)) as server:
        alone = asyncio.run(_mixed_requests(server.url, poison=False))
        mixed = asyncio.run(_mixed_requests(server.url, poison=True))
        assert server.wait_idle()
    assert [s for s, _ in alone] == [200, 200, 200]
    assert [(s, _content(t)) for s, t in mixed[:3]] == [(s, _content(t)) for s, t in alone]
    stream_status, stream = mixed[3]
    events = _events(stream)
    assert stream_status == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "poisoned row" in error["message"]
    assert any(json.loads(e)["choices"][0]["delta"].get("content") for e in events[1:-2])  # it had started
    plain_status, plain = mixed[4]
    assert plain_status == 500 and json.loads(plain)["error"]["code"] == "generation_failed"
