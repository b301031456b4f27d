"""Tool calling through the official `openai` client: required and named calls carry arguments
that validate against each tool's JSON Schema (checked with `jsonschema`), parallel calls get
distinct ids, streamed deltas reassemble to the non-streamed answer, and `tool` messages reach
the chat template."""
import json

import httpx
import jsonschema
import pytest

from lmforge.serve import EngineConfig
from lmforge.serve.tools import ToolCallParser, parse_all
from lmforge.tokenizer.chat import tool_chat_messages
from tests.serve.helpers import RunningServer, tiny_model

openai = pytest.importorskip("openai")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "number"},
                                        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,5}$"},
                                                 "maxItems": 2}},
       "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smollm_tokenizer):
    model = tiny_model(smollm_tokenizer.vocab_size, max_seq_len=1024)  # room for the tool list in the prompt
    with RunningServer(model, smollm_tokenizer, "tiny", EngineConfig(kv_cache_mb=32)) as s:
        yield s


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _valid(call, names=SCHEMAS):
    assert call.type == "function" and call.function.name in names and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_calls_are_schema_valid_with_distinct_ids(server):
    r = client(server).chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                               n=4, seed=4, temperature=1.0, max_tokens=400)
    counts = []
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        for call in choice.message.tool_calls:
            _valid(call)
        ids = [c.id for c in choice.message.tool_calls]
        assert len(set(ids)) == len(ids)
        counts.append(len(ids))
    assert max(counts) >= 2                     # parallel calls happen (random model, fixed seed)
    single = client(server).chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                                    n=2, seed=4, max_tokens=200, parallel_tool_calls=False)
    assert all(len(c.message.tool_calls) == 1 for c in single.choices)


def test_named_call_is_that_tool_and_schema_valid(server):
    r = client(server).chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, n=4, seed=1, max_tokens=300,
        tool_choice={"type": "function", "function": {"name": "add"}})
    for choice in r.choices:
        (call,) = choice.message.tool_calls
        assert call.function.name == "add"
        _valid(call)


def test_streamed_deltas_reassemble_to_the_non_streamed_answer(server):
    c = client(server)
    kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", n=2, seed=7, max_tokens=200)
    full = c.chat.completions.create(**kwargs)
    calls: dict[tuple[int, int], dict] = {}
    finish = {}
    for chunk in c.chat.completions.create(**kwargs, stream=True):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault((ch.index, d.index), {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert entry["id"] is None
                    entry.update(id=d.id, name=d.function.name)
                entry["arguments"] += d.function.arguments or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    for choice in full.choices:
        got = [calls[(choice.index, k)] for k in range(len(choice.message.tool_calls))]
        assert [(g["name"], g["arguments"]) for g in got] == [
            (t.function.name, t.function.arguments) for t in choice.message.tool_calls]
        assert all(g["id"] for g in got) and finish[choice.index] == choice.finish_reason == "tool_calls"


def test_auto_answers_in_text_or_in_valid_calls(server):
    r = client(server).chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, n=6, seed=3,
                                               max_tokens=30)
    for choice in r.choices:
        if choice.message.tool_calls:
            for call in choice.message.tool_calls:
                _valid(call)
        else:
            assert not choice.message.content.startswith("<tool_call>")
    none = client(server).chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                                  max_tokens=5, seed=0)
    assert none.choices[0].message.tool_calls is None


def test_parser_at_every_split_equals_the_whole():
    text = ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, "}"]}}\n</tool_call>\n'
            '<tool_call>\n{"name":"get_weather","arguments":{"city":"Pa\\"ris"}}\n</tool_call>')
    content, whole = parse_all(text)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in whole] == [
        ("add", {"a": 1, "b": [2, "}"]}), ("get_weather", {"city": 'Pa"ris'})]
    for cut in range(len(text) + 1):
        p = ToolCallParser()
        events = p.feed(text[:cut]) + p.feed(text[cut:], final=True)
        assert [(c.name, c.arguments) for c in p.calls] == [(c.name, c.arguments) for c in whole]
        assert "".join(e[2] for e in events if e[0] == "args") == "".join(c.arguments for c in whole)
    assert parse_all("<tool_c")[0] == "<tool_c" and parse_all("Hello")[0] == "Hello"


def test_tool_messages_reach_the_template(server, smollm_tokenizer):
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    tok = smollm_tokenizer
    rendered = tok.apply_chat_template(tool_chat_messages(history, TOOLS, tok.chat_template))
    assert '"name": "get_weather"' in rendered and "<tools>" in rendered
    assert "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>" in rendered
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in rendered
    r = client(server).chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4, seed=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_bad_tool_requests_are_400(server):
    bad = [{"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
           {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
               "x": {"type": "integer", "minimum": 3}}}}}], "tool_choice": "required"},
           {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
           {"tools": TOOLS, "tool_choice": "sometimes"}, {"tool_choice": "required"},
           {"tools": TOOLS + TOOLS[:1]}, {"tools": TOOLS, "response_format": {"type": "json_object"}}]
    for extra in bad:
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **extra})
        assert r.status_code == 400 and r.json()["error"]["message"], extra


@pytest.mark.slow
def test_smollm2_required_call(smollm, smollm_tokenizer):
    with RunningServer(smollm, smollm_tokenizer, "smollm2", EngineConfig(kv_cache_mb=32)) as s:
        r = client(s).chat.completions.create(model="smollm2", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                              temperature=0, max_tokens=60)
        (call, *_) = r.choices[0].message.tool_calls
        _valid(call)
        assert call.function.name == "get_weather" and "Paris" in call.function.arguments
