"""Malformed requests: every kind gets a 4xx with an OpenAI-style JSON error, and the server keeps
serving correct requests afterwards."""
import httpx
import pytest

from lmforge.serve import EngineConfig
from tests.serve.helpers import RunningServer

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


def chat(**over):
    return {"model": "tiny", "messages": MSG, **over}


def comp(**over):
    return {"model": "tiny", "prompt": "hi", **over}


# (name, method, path, json body or raw bytes, expected status)
CASES = [
    ("invalid json", "POST", CHAT, b"{bad", 400),
    ("empty body", "POST", CHAT, b"", 400),
    ("array body", "POST", CHAT, [], 400),
    ("string body", "POST", CHAT, "hello", 400),
    ("missing model", "POST", CHAT, {"messages": MSG}, 400),
    ("model not a string", "POST", CHAT, chat(model=5), 400),
    ("unknown model", "POST", CHAT, chat(model="gpt-9"), 404),
    ("missing messages", "POST", CHAT, {"model": "tiny"}, 400),
    ("empty messages", "POST", CHAT, chat(messages=[]), 400),
    ("messages not a list", "POST", CHAT, chat(messages="hi"), 400),
    ("message is null", "POST", CHAT, chat(messages=[None]), 400),
    ("message without role", "POST", CHAT, chat(messages=[{"content": "hi"}]), 400),
    ("unknown role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400),
    ("content is a number", "POST", CHAT, chat(messages=[{"role": "user", "content": 42}]), 400),
    ("image content part", "POST", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400),
    ("text part without text", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400),
    ("temperature string", "POST", CHAT, chat(temperature="hot"), 400),
    ("temperature negative", "POST", CHAT, chat(temperature=-0.5), 400),
    ("temperature too high", "POST", CHAT, chat(temperature=3), 400),
    ("top_p above 1", "POST", CHAT, chat(top_p=1.5), 400),
    ("top_k below -1", "POST", CHAT, chat(top_k=-5), 400),
    ("max_tokens zero", "POST", CHAT, chat(max_tokens=0), 400),
    ("max_tokens negative", "POST", CHAT, chat(max_tokens=-3), 400),
    ("max_tokens float", "POST", CHAT, chat(max_tokens=10.5), 400),
    ("max_tokens string", "POST", CHAT, chat(max_tokens="10"), 400),
    ("max_tokens beyond context", "POST", CHAT, chat(max_tokens=10**6), 400),
    ("prompt longer than context", "POST", CHAT, chat(messages=[{"role": "user", "content": "word " * 3000}]), 400),
    ("n zero", "POST", CHAT, chat(n=0), 400),
    ("n too large", "POST", CHAT, chat(n=100), 400),
    ("stream not a bool", "POST", CHAT, chat(stream="yes"), 400),
    ("stream_options without stream", "POST", CHAT, chat(stream_options={"include_usage": True}), 400),
    ("stop list of ints", "POST", CHAT, chat(stop=[1, 2]), 400),
    ("stop empty string", "POST", CHAT, chat(stop=""), 400),
    ("too many stop strings", "POST", CHAT, chat(stop=[f"s{i}" for i in range(20)]), 400),
    ("seed string", "POST", CHAT, chat(seed="42"), 400),
    ("seed too large", "POST", CHAT, chat(seed=2**70), 400),
    ("logprobs string", "POST", CHAT, chat(logprobs="yes"), 400),
    ("top_logprobs too large", "POST", CHAT, chat(logprobs=True, top_logprobs=50), 400),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=3), 400),
    ("presence_penalty out of range", "POST", CHAT, chat(presence_penalty=5), 400),
    ("frequency_penalty string", "POST", CHAT, chat(frequency_penalty="a lot"), 400),
    ("logit_bias non-numeric key", "POST", CHAT, chat(logit_bias={"abc": 1}), 400),
    ("logit_bias value out of range", "POST", CHAT, chat(logit_bias={"5": 1000}), 400),
    ("logit_bias token out of vocab", "POST", CHAT, chat(logit_bias={"999999999": 5}), 400),
    ("tool choice names no tool", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                                      tool_choice={"type": "function", "function": {"name": "g"}}), 400),
    ("tool without a name", "POST", CHAT, chat(tools=[{"type": "function", "function": {}}]), 400),
    ("unknown response_format", "POST", CHAT, chat(response_format={"type": "yaml"}), 400),
    ("unsupported schema keyword", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "object", "patternProperties": {"^a": {"type": "string"}}}}}), 400),
    ("ignore_eos not a bool", "POST", CHAT, chat(ignore_eos="true"), 400),
    ("completion without prompt", "POST", COMP, {"model": "tiny"}, 400),
    ("completion empty prompt list", "POST", COMP, comp(prompt=[]), 400),
    ("completion empty token list", "POST", COMP, comp(prompt=[[]]), 400),
    ("completion prompt of bools", "POST", COMP, comp(prompt=[True, False]), 400),
    ("completion prompt of mixed types", "POST", COMP, comp(prompt=["a", 1]), 400),
    ("completion token id out of vocab", "POST", COMP, comp(prompt=[10**9]), 400),
    ("completion negative token id", "POST", COMP, comp(prompt=[-1]), 400),
    ("completion empty string prompt", "POST", COMP, comp(prompt=""), 400),
    ("completion suffix", "POST", COMP, comp(suffix="end"), 400),
    ("completion best_of differs from n", "POST", COMP, comp(best_of=3), 400),
    ("completion logprobs too large", "POST", COMP, comp(logprobs=100), 400),
    ("completion max_tokens 0 without echo", "POST", COMP, comp(max_tokens=0), 400),
    ("completion max_tokens beyond context", "POST", COMP, comp(max_tokens=100_000), 400),
    ("GET on a POST route", "GET", CHAT, None, 405),
    ("unknown route", "POST", "/v1/engines/x/completions", comp(), 404),
    ("body too large", "POST", CHAT, b'{"model": "tiny", "messages": [], "x": "' + b"a" * (2 << 20) + b'"}', 413),
    ("unknown model lookup", "GET", "/v1/models/nope", None, 404),
]


@pytest.fixture(scope="module")
def server(tiny, smollm_tokenizer):
    with RunningServer(tiny, smollm_tokenizer, "tiny", EngineConfig(kv_cache_mb=16)) as s:
        yield s


def test_at_least_fifty_kinds():
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


def test_malformed_requests_get_4xx_json_and_the_server_keeps_serving(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for name, method, path, body, status in CASES:
            if isinstance(body, bytes):
                r = http.request(method, path, content=body, headers={"Content-Type": "application/json"})
            elif body is None:
                r = http.request(method, path)
            else:
                r = http.request(method, path, json=body)
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["message"] and "Traceback" not in r.text, name
        ok = http.post(CHAT, json=chat(max_tokens=4))
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
        assert http.get("/health").json()["status"] == "ok"
    assert server.wait_idle()


def test_context_error_is_explicit(server):
    r = httpx.post(server.url + CHAT, json=chat(max_tokens=10**6))
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length" in r.json()["error"]["message"]
