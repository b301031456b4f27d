"""Constrained decoding: JSON Schema / regex -> byte DFA -> token masks.

References: Python's `re` for the regex compiler, `jsonschema` for every constrained output
(100 % of temperature-1 samples from generated schemas must validate), the official `openai`
client for response_format through the server."""
import json
import random
import re

import httpx
import jsonschema
import pytest

from lmforge.serve import EngineConfig, LLMEngine, SamplingParams
from lmforge.serve.grammar import SchemaError, compile_dfa, compile_grammar
from lmforge.serve.grammar.regex import RegexError, compile_regex
from tests.serve.helpers import RunningServer

openai = pytest.importorskip("openai")

# --- the regex compiler against Python's re ---------------------------------------------------------
PATTERNS = {r"a+b?": "aab", r"(ab|cd)*e": "abcde", r"[0-9]{2,4}": "123", r"[^x]*x": "éax", r"\d+(\.\d+)?": "1.5",
            r"[a-c]{0,2}z|q": "acz", r"\w+@\w+\.com": "a@b.com", r"(?:é|ü|日本)+": "é日本", r".{3}": "a日b",
            r"[\s,]+": " ,", r"x{2,}": "xxx", r"[^\d\s]+": "aé", r"\x41\u00e9+": "Aéé"}
ALPHABET = ["a", "b", "c", "d", "e", "x", "z", "q", "0", "5", ".", "@", "com", " ", ",", "é", "ü", "日本", "A", "\n"]


def _mutations(rng: random.Random, s: str) -> str:
    """s with a few random insertions, deletions or replacements."""
    chars = list(s)
    for _ in range(rng.randint(0, 3)):
        i = rng.randint(0, len(chars))
        op = rng.choice("idr")
        if op == "i":
            chars.insert(i, rng.choice(ALPHABET))
        elif chars and i < len(chars):
            chars[i:i + 1] = [] if op == "d" else [rng.choice(ALPHABET)]
    return "".join(chars)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_regex_dfa_agrees_with_python_re(pattern):
    """Full-match answers equal re.fullmatch's (ASCII classes, as in JSON Schema's ECMA-262) on
    random strings and on random edits of a matching one."""
    dfa = compile_regex(pattern)
    rng = random.Random(pattern)
    hits = 0
    for k in range(2000):
        s = _mutations(rng, PATTERNS[pattern]) if k % 2 else "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6)))
        want = bool(re.fullmatch(pattern, s, re.ASCII))
        assert dfa.matches(s.encode()) == want, (pattern, s)
        hits += want
    assert hits > 20


def test_regex_refuses_what_it_cannot_do():
    for bad in [r"(?=a)b", r"(a)\1", r"a^b", r"[z-a]", r"(ab", r"a{5000}"]:
        with pytest.raises(RegexError):
            compile_regex(bad)


# --- generated schemas: every temperature-1 output validates ------------------------------------------
STRING_PATTERNS = [r"^[a-z]{1,8}$", r"^[A-Z][a-z]{0,6}$", r"^\d{3}-\d{4}$", r"^(red|green|blue)$", r"^[a-f0-9]{4,6}$"]


def random_schema(rng: random.Random, depth: int = 0):
    kinds = ["integer", "number", "boolean", "null", "enum", "string", "pattern"]
    if depth < 3:
        kinds += ["object", "object", "array", "anyOf"]
    kind = rng.choice(kinds)
    if kind == "object":
        n = rng.randint(1, 4)
        props = {f"p{depth}_{i}": random_schema(rng, depth + 1) for i in range(n)}
        required = [k for k in props if rng.random() < 0.6]
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    if kind == "array":
        lo = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo, "maxItems": lo + rng.randint(0, 3)}
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1), random_schema(rng, depth + 1)]}
    if kind == "enum":
        return {"enum": rng.sample(["a", "b c", 1, 2.5, True, None, "ü"], rng.randint(1, 4))}
    if kind == "string":
        lo = rng.randint(0, 3)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(0, 6)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(STRING_PATTERNS)}
    if kind == "number" and rng.random() < 0.3:
        return {"type": ["number", "null"]}
    return {"type": kind}


def schemas(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = [{"type": "object", "properties": {"root": random_schema(rng)}, "required": ["root"]} for _ in range(n - 2)]
    out.append({"$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                                    "required": ["x", "y"]}},
                "type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 3})
    out.append({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                 "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                                          "maxItems": 3}}, "required": ["name"]})
    return out


@pytest.mark.slow
def test_generated_schemas_all_validate_at_temperature_1(tiny, smollm_tokenizer):
    tok = smollm_tokenizer
    engine = LLMEngine(tiny, tok, EngineConfig(kv_cache_mb=64, max_num_seqs=64))
    cases = schemas(52)
    params = [SamplingParams(max_tokens=400, temperature=1.0, seed=i,
                             grammar=compile_grammar(("json_schema", s), tok, engine.vocab_size))
              for i, s in enumerate(cases)]
    results = engine.generate([tok.encode("Answer in JSON:")] * len(cases), params)  # one continuous batch
    for schema, r in zip(cases, results):
        assert r["finish_reason"] == "stop", (schema, r["text"])
        jsonschema.validate(json.loads(r["text"]), schema)
    assert len({r["text"] for r in results}) > 40          # real, varied samples


def test_greedy_with_a_grammar_is_batch_independent(tiny, smollm_tokenizer):
    tok = smollm_tokenizer
    engine = LLMEngine(tiny, tok, EngineConfig(kv_cache_mb=64))
    g = compile_grammar(("json_schema", schemas(3, seed=5)[0]), tok, engine.vocab_size)
    prompt = tok.encode("Give JSON")
    alone = engine.generate([prompt], SamplingParams(max_tokens=60, temperature=0, grammar=g))[0]
    mixed = engine.generate([prompt, tok.encode("Hello there"), prompt],
                            [SamplingParams(max_tokens=60, temperature=0, grammar=g),
                             SamplingParams(max_tokens=20, temperature=0),
                             SamplingParams(max_tokens=60, temperature=1.0, seed=3, grammar=g)])
    assert mixed[0]["token_ids"] == alone["token_ids"]
    assert mixed[1]["token_ids"] == engine.generate([tok.encode("Hello there")], SamplingParams(max_tokens=20, temperature=0))[0]["token_ids"]


def test_mask_allows_exactly_the_viable_tokens(smollm_tokenizer):
    """Brute force at a few states (6000 random tokens, 3000 allowed ones, all specials): a token
    is allowed iff its bytes keep the DFA alive, walked byte by byte (the stop tokens iff the
    state accepts)."""
    tok = smollm_tokenizer
    g = compile_grammar(("regex", r'\{"k": (true|false|[0-9]{1,3}|"[^"]*")\}'), tok)
    rng = random.Random(0)
    specials = set(tok.hf.get_added_tokens_decoder())
    for prefix in [b"", b'{"k": ', b'{"k": "a', b'{"k": 12}']:
        state = g.dfa.walk(0, prefix)
        mask = g.mask(state)
        sample = set(rng.sample(range(len(tok.token_bytes_table)), 6000)) | set(mask.nonzero().flatten().tolist()[:3000])
        for i in sorted(sample | specials):
            data = tok.token_bytes_table[i]
            if i in g.table.stop_ids:
                want = bool(g.dfa.accepting[state])
            elif i in specials:
                want = False
            else:
                want = g.dfa.walk(state, data) >= 0
            assert bool(mask[i]) == want, (prefix, i, data)


def test_unsupported_schemas_are_refused():
    for bad in [{"type": "integer", "minimum": 0}, {"type": "string", "format": "email"}, {"oneOf": [{}, {}]},
                {"type": "array", "uniqueItems": True}, {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}},
                {"type": "object", "patternProperties": {}}, {"type": "string", "pattern": "(?=x)"}]:
        with pytest.raises(SchemaError):
            compile_dfa(("json_schema", bad))


# --- through the server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(tiny, smollm_tokenizer):
    with RunningServer(tiny, smollm_tokenizer, "tiny", EngineConfig(kv_cache_mb=32)) as server:
        yield server


def test_response_format_through_the_openai_client(tiny_server):
    c = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)
    schema = schemas(2, seed=9)[-1]
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=300, n=3,
                                  seed=1, response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)
    done = c.completions.create(model="tiny", prompt="Phone:", max_tokens=20, seed=3,
                                extra_body={"response_format": {"type": "regex", "regex": r"\d{3}-\d{4}"}})
    assert re.fullmatch(r"\d{3}-\d{4}", done.choices[0].text)
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=300,
                                       seed=1, stream=True,
                                       response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == r.choices[0].message.content


def test_unsupported_response_format_is_a_400(tiny_server):
    for rf in [{"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "number", "maximum": 3}}},
               {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "string", "pattern": r"(a)\1"}}},
               {"type": "yaml"}, {"type": "json_schema"}]:
        r = httpx.post(tiny_server.url + "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": rf})
        assert r.status_code == 400 and r.json()["error"]["message"], rf


@pytest.mark.slow
def test_smollm2_json_schema_outputs_validate(smollm, smollm_tokenizer):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "country": {"enum": ["France", "Germany", "Italy"]},
                                               "population_millions": {"type": "number"}},
              "required": ["city", "country", "population_millions"]}
    with RunningServer(smollm, smollm_tokenizer, "smollm2", EngineConfig(kv_cache_mb=32)) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Describe the capital of France as JSON."}],
            max_tokens=80, n=3, seed=0, temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
        for choice in r.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), schema)
        obj = c.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Give a JSON object with a name and an age."}],
            max_tokens=80, seed=1, response_format={"type": "json_object"})
        assert obj.choices[0].finish_reason == "stop" and isinstance(json.loads(obj.choices[0].message.content), dict)
