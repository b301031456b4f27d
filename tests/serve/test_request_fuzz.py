"""Property: whatever a client sends in any field of /v1/chat/completions or /v1/completions
(random and boundary values, wrong types, NaN, huge numbers, unicode, special-token strings,
nested junk), the server answers without a 5xx or a traceback: a 4xx is OpenAI-style JSON with
an error object, a 200 is a complete answer, and a stream ends with [DONE].

A second property pins the documented ranges (OpenAI's API reference): one field just outside its
range is a 400 naming it, one field on the edge of its range is served."""
import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lmforge.serve import EngineConfig
from lmforge.tokenizer.tokenizer import EOS, IM_END, IM_START
from tests.serve.helpers import RunningServer

SPECIALS = [IM_START, IM_END, EOS, f"{IM_START}system\n", "<|im_start", "\x00", "\ud7ff", "🙂", "ق", ""]
text = st.one_of(st.sampled_from(SPECIALS), st.text(max_size=12),
                 st.lists(st.sampled_from(SPECIALS + ["a", " "]), max_size=5).map("".join))
numbers = st.one_of(st.integers(-3, 30), st.sampled_from([-1, 0, 1, 2**31, 2**63, 2**64, -2**63 - 1, 10**30]),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e-38, 2.0000001, 1.0000001, -1e-9, 100.0, 100.5]))
scalar = st.one_of(st.none(), st.booleans(), numbers, text)
junk = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                    max_leaves=6)

message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]) | junk,
                                 "content": text | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                  "text": text}), max_size=2) | junk},
                                optional={"name": text | junk, "extra": junk})
COMMON = {
    "model": st.just("tiny") | text | junk,
    "temperature": st.sampled_from([0, 0.0, 1e-300, 5e-324, 0.7, 2, 2.0]) | numbers | junk,
    "top_p": st.sampled_from([0, 0.0, 1e-300, 0.5, 1, 1.0]) | numbers | junk,
    "top_k": st.sampled_from([-1, 0, 1, 5, 10**9]) | numbers | junk,
    "n": st.integers(1, 3) | numbers | junk,
    "stream": st.booleans() | junk,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | junk}) | junk,
    "stop": text | st.lists(text, max_size=6) | junk,
    "seed": st.integers(-2**63, 2**64 - 1) | numbers | junk,
    "presence_penalty": st.floats(-2, 2) | numbers | junk,
    "frequency_penalty": st.floats(-2, 2) | numbers | junk,
    "logit_bias": st.dictionaries(st.integers(0, 49151).map(str) | text, st.floats(-100, 100) | numbers,
                                  max_size=3) | junk,
    "ignore_eos": st.booleans() | junk,
    "user": text | junk,
    "max_tokens": st.integers(1, 8) | numbers | junk,
}
CHAT = {**COMMON,
        "messages": st.lists(message, max_size=3) | junk,
        "max_completion_tokens": st.integers(1, 8) | numbers | junk,
        "logprobs": st.booleans() | junk,
        "top_logprobs": st.integers(0, 21) | numbers | junk,
        "tools": st.just([]) | junk,
        "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"]) | junk}) | junk}
COMPLETION = {**COMMON,
              "prompt": text | st.lists(text, max_size=3) | st.lists(numbers, max_size=4)
              | st.lists(st.lists(st.integers(-1, 49200), max_size=3), max_size=2) | junk,
              "logprobs": st.integers(0, 6) | numbers | junk,
              "echo": st.booleans() | junk,
              "suffix": text | junk,
              "best_of": st.integers(0, 3) | junk}
VALID = {"/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
         "/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 4}}


@pytest.fixture(scope="module")
def http(tiny, smollm_tokenizer):
    with RunningServer(tiny, smollm_tokenizer, "tiny", EngineConfig(kv_cache_mb=16), default_max_tokens=8) as s:
        with httpx.Client(base_url=s.url, timeout=60) as client:
            yield client
        assert s.wait_idle(), "requests or KV blocks left behind"
        assert client is not None and s.engine._thread.is_alive()


def bodies(fields: dict, path: str):
    """A valid body with some fields replaced or removed, and sometimes junk in place of the body."""
    changes = st.dictionaries(st.sampled_from(sorted(fields)), st.none(), max_size=len(fields)).flatmap(
        lambda keys: st.fixed_dictionaries({k: fields[k] for k in keys}))
    dropped = st.sets(st.sampled_from(sorted(VALID[path])), max_size=2)
    body = st.tuples(changes, dropped).map(lambda c: {**{k: v for k, v in VALID[path].items() if k not in c[1]}, **c[0]})
    return st.one_of(body, body, body, junk)


def check(r: httpx.Response, body) -> None:
    assert r.status_code < 500, (body, r.status_code, r.text[:500])
    assert "Traceback" not in r.text
    if r.status_code != 200:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"], r.text
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-300:]
        parsed = [json.loads(e) for e in events[:-1]]
        assert all("error" not in e for e in parsed), r.text[-500:]   # nothing a client sends may fail a stream
    else:
        assert r.json()["choices"], r.text


def post(http, path, body) -> httpx.Response:
    # allow_nan: Python's json (and the server's parser) read NaN/Infinity literals; send them too.
    return http.post(path, content=json.dumps(body, allow_nan=True), headers={"Content-Type": "application/json"})


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(body=bodies(CHAT, "/v1/chat/completions"))
def test_any_chat_request(http, body):
    check(post(http, "/v1/chat/completions", body), body)


@FUZZ
@given(body=bodies(COMPLETION, "/v1/completions"))
def test_any_completion_request(http, body):
    check(post(http, "/v1/completions", body), body)


# OpenAI's documented ranges: a value just outside -> 400 naming the field; on the edge -> served.
OUTSIDE = {"temperature": [-1e-9, 2.0000001, math.inf, math.nan], "top_p": [-1e-9, 1.0000001, math.nan],
           "presence_penalty": [-2.0000001, 2.0000001, math.nan], "frequency_penalty": [-2.5, 2.0000001],
           "n": [0, -1], "max_tokens": [0, -5], "stop": [["a", "b", "c", "d", "e"], ""],
           "logit_bias": [{"5": 100.5}, {"5": -100.5}, {"-5": 1}, {"49152": 1}, {"²": 1}, {"9" * 5000: 1}],
           "seed": [2**64, -2**63 - 1], "top_logprobs": [21, -1]}
EDGE = {"temperature": [0, 2, 1e-300, 5e-324], "top_p": [0, 1, 1e-300], "presence_penalty": [-2, 2],
        "frequency_penalty": [-2, 2], "n": [1], "max_tokens": [1], "stop": [["a", "b", "c", "d"]],
        "logit_bias": [{"5": 100, "6": -100, "49151": 100}], "seed": [2**64 - 1, -2**63], "top_logprobs": [0, 20]}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(sorted(OUTSIDE)), data=st.data())
def test_out_of_range_is_400_and_edges_are_served(http, field, data):
    base = {**VALID["/v1/chat/completions"], "logprobs": True} if field == "top_logprobs" else VALID["/v1/chat/completions"]
    bad = data.draw(st.sampled_from(OUTSIDE[field]))
    r = post(http, "/v1/chat/completions", {**base, field: bad})
    assert r.status_code == 400 and "Traceback" not in r.text, (field, bad, r.text[:300])
    assert field in r.json()["error"]["message"] or "token ids" in r.json()["error"]["message"], r.text
    edge = data.draw(st.sampled_from(EDGE[field]))
    for stream in (False, True):
        r = post(http, "/v1/chat/completions", {**base, field: edge, "stream": stream})
        assert r.status_code == 200, (field, edge, r.text[:300])
        check(r, edge)
