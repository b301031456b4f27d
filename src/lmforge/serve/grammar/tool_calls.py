"""The grammar of tool calls in the Hermes format that lmforge's chat prompt asks for:

    <tool_call>
    {"name": "NAME", "arguments": ARGS}
    </tool_call>

one call, or several separated by a newline (parallel calls), each ARGS following its tool's
JSON Schema. In `auto` mode the model may instead answer in text, which must then not begin with
the `<tool_call>` tag (so a started call is always a constrained one).
"""
from __future__ import annotations

import json

from lmforge.serve.grammar.json_schema import COLON, COMMA, SchemaError, schema_to_ast
from lmforge.serve.grammar.regex import Alt, Cat, Chars, Repeat, literal, negate

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def _call(name: str, parameters) -> Cat:
    return Cat((literal(OPEN + "\n{"), literal(json.dumps("name")), COLON, literal(json.dumps(name)), COMMA,
                literal(json.dumps("arguments")), COLON, schema_to_ast(parameters), literal("}\n" + CLOSE)))


def _not_starting_with(prefix: str):
    """Any text that does not begin with `prefix` (its proper prefixes included)."""
    anything = Repeat(Chars(negate([])), 0, None)
    branches = []
    for i, c in enumerate(prefix):
        branches.append(literal(prefix[:i]))
        branches.append(Cat((literal(prefix[:i]), Chars(negate([(ord(c), ord(c))])), anything)))
    return Alt(tuple(branches))


def tool_calls_ast(spec: dict):
    """spec: {"tools": {name: parameters schema}, "choice": "auto"|"required"|NAME, "parallel": bool}."""
    tools, choice = spec["tools"], spec["choice"]
    names = [choice] if choice not in ("auto", "required") else list(tools)
    calls = []
    for name in names:
        try:
            calls.append(_call(name, tools[name]))
        except SchemaError as e:
            raise SchemaError(f"tool {name!r} parameters: {e}") from e
    one = calls[0] if len(calls) == 1 else Alt(tuple(calls))
    parallel = spec["parallel"] and choice in ("auto", "required")  # a named choice is one call of it
    many = Cat((one, Repeat(Cat((literal("\n"), one)), 0, None))) if parallel else one
    if choice == "auto":
        return Alt((many, _not_starting_with(OPEN)))
    return many

