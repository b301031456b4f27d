"""The HTTP server with the official `openai` client (unmodified), and the server's own routes:
models, health, metrics, auth, n choices, logprobs, cancellation on disconnect, 429."""
import asyncio

import httpx
import pytest

from lmforge.serve import EngineConfig
from tests.serve.helpers import RunningServer

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def smol_server(smollm, smollm_tokenizer):
    with RunningServer(smollm, smollm_tokenizer, "smollm2") as server:
        yield server


@pytest.fixture(scope="module")
def tiny_server(tiny, smollm_tokenizer):
    with RunningServer(tiny, smollm_tokenizer, "tiny", EngineConfig(kv_cache_mb=64)) as server:
        yield server


def client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, **kw)


def test_openai_client_chat_streaming_and_not(smol_server):
    c = client(smol_server)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = c.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    answer = full.choices[0].message.content
    assert "Paris" in answer and full.choices[0].message.role == "assistant"
    assert full.usage.prompt_tokens > 10 and 0 < full.usage.completion_tokens <= 24
    chunks = list(c.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == answer
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0   # same prompt again: prefix cache


def test_openai_client_completions_streaming_and_not(smol_server):
    c = client(smol_server)
    full = c.completions.create(model="smollm2", prompt="def add(a, b):\n", max_tokens=16, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="smollm2", prompt="def add(a, b):\n", max_tokens=16, temperature=0, stream=True))
    assert streamed == full.choices[0].text and "return" in streamed
    assert full.object == "text_completion" and full.usage.completion_tokens == 16


def test_models_health_metrics(tiny_server):
    c = client(tiny_server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert c.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")
    c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert httpx.get(tiny_server.url + "/health").json()["status"] == "ok"
    metrics = httpx.get(tiny_server.url + "/metrics").text
    for name in ("lmforge_time_to_first_token_seconds_count", "lmforge_inter_token_latency_seconds_bucket",
                 "lmforge_queue_depth", "lmforge_running_requests", "lmforge_generation_tokens_per_second",
                 "lmforge_kv_blocks_used", "lmforge_generation_tokens_total"):
        assert name in metrics
    ttft_count = next(line for line in metrics.splitlines() if line.startswith("lmforge_time_to_first_token_seconds_count"))
    assert int(ttft_count.split()[-1]) >= 1


def test_n_choices_seed_and_logprobs(tiny_server):
    c = client(tiny_server)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                  n=3, seed=11, temperature=1.0, logprobs=True, top_logprobs=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in r.choices}) > 1      # n choices from one seed still differ
    lp = r.choices[0].logprobs.content
    assert len(lp) == 5 and len(lp[0].top_logprobs) == 2 and all(x.logprob <= 0 for x in lp)
    again = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                      n=3, seed=11, temperature=1.0)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in r.choices]
    batch = c.completions.create(model="tiny", prompt=["a", "b"], max_tokens=3, n=2, logprobs=1)
    assert len(batch.choices) == 4 and batch.usage.completion_tokens == 12
    assert len(batch.choices[0].logprobs.tokens) == 3


def test_api_key(tiny, smollm_tokenizer):
    with RunningServer(tiny, smollm_tokenizer, "tiny", api_key="s3cret") as server:
        with pytest.raises(openai.AuthenticationError):
            client(server).models.list()
        ok = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == "tiny"
        assert httpx.get(server.url + "/health").status_code == 200     # health stays public
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def cancelled(server) -> int:
    return server.engine.metrics.cancelled


def test_streaming_disconnect_cancels_and_frees_blocks(tiny_server):
    before = cancelled(tiny_server)
    body = {"model": "tiny", "prompt": "x " * 50, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", tiny_server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
    assert tiny_server.wait_idle(), "blocks still held after the client left"
    assert cancelled(tiny_server) == before + 1


def test_non_streaming_disconnect_cancels(tiny_server):
    before = cancelled(tiny_server)
    body = {"model": "tiny", "prompt": "y " * 50, "max_tokens": 440, "ignore_eos": True}
    # Make the engine slow enough that the request is still running when the client gives up.
    runner = tiny_server.engine.engine.runner
    real_run = runner.run

    def slow_run(items):
        import time
        time.sleep(0.01)
        return real_run(items)
    runner.run = slow_run
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=0.5)
        assert tiny_server.wait_idle()
    finally:
        runner.run = real_run
    assert cancelled(tiny_server) == before + 1


def test_full_queue_answers_429(tiny, smollm_tokenizer):
    config = EngineConfig(kv_cache_mb=16, max_num_seqs=1)
    with RunningServer(tiny, smollm_tokenizer, "tiny", config, max_queue=2) as server:
        async def fire():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                body = {"model": "tiny", "prompt": "z", "max_tokens": 60, "ignore_eos": True}
                return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(10)))
        responses = asyncio.run(fire())
        codes = sorted(r.status_code for r in responses)
        # the 2 queue slots always fill; whether the engine has taken one into its single running slot
        # before the other requests arrive (a third 200) is a race, so it is not asserted
        assert set(codes) == {200, 429} and codes.count(200) >= 2
        err = next(r for r in responses if r.status_code == 429).json()["error"]
        assert err["type"] == "rate_limit_error" and "capacity" in err["message"]
        assert server.wait_idle()
