"""Constrained decoding: JSON Schema / JSON / regex -> byte-level DFA -> per-step token masks.

    grammar = compile_grammar(("json_schema", schema), tokenizer, vocab_size)   # cached
    matcher = grammar.matcher()          # one per sequence
    logits[~matcher.mask()] = -inf; token = sample(logits); matcher.advance(token)

Unsupported schema keywords or regex syntax raise SchemaError / RegexError (LmforgeError), which
the server answers with a 400 before any generation starts.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

from lmforge.serve.grammar.json_schema import SchemaError, any_json, schema_to_ast
from lmforge.serve.grammar.regex import DFA, RegexError, compile_ast, parse
from lmforge.serve.grammar.token_mask import Matcher, TokenGrammar, TokenTable
from lmforge.serve.grammar.tool_calls import tool_calls_ast

__all__ = [
    "DFA",
    "Matcher",
    "RegexError",
    "SchemaError",
    "TokenGrammar",
    "TokenTable",
    "compile_dfa",
    "compile_grammar",
]

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 64
_lock = threading.Lock()


def compile_dfa(spec: tuple[str, object]) -> DFA:
    """("json_schema", schema) | ("json_object", None) | ("regex", pattern) | ("tool_calls", spec)
    (see grammar.tool_calls) | ("ast", node) -> DFA."""
    kind, value = spec
    if kind == "json_schema":
        return compile_ast(schema_to_ast(value))
    if kind == "json_object":
        return compile_ast(any_json(object_only=True))
    if kind == "regex":
        if not isinstance(value, str):
            raise RegexError("regex must be a string")
        return compile_ast(parse(value))
    if kind == "tool_calls":
        return compile_ast(tool_calls_ast(value))
    if kind == "ast":
        return compile_ast(value)
    raise ValueError(f"unknown grammar kind {kind!r}")


def compile_grammar(spec: tuple[str, object], tokenizer, vocab_size: int | None = None) -> TokenGrammar:
    """A TokenGrammar for this tokenizer, from a cache keyed by the spec's canonical JSON."""
    vocab_size = vocab_size or tokenizer.vocab_size
    key = (spec[0], spec[1] if spec[0] == "ast" else json.dumps(spec[1], sort_keys=True), id(tokenizer), vocab_size)
    with _lock:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    grammar = TokenGrammar(compile_dfa(spec), TokenTable.from_tokenizer(tokenizer, vocab_size))
    with _lock:
        _CACHE[key] = grammar
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return grammar
