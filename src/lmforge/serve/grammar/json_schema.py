"""JSON Schema -> regular-expression AST for the JSON texts that validate.

Output is compact JSON (an optional single space after ':' and ','), object properties in the
schema's order (required ones always, optional ones may be left out; no others are written, which
additionalProperties of any value allows). What cannot be expressed exactly is refused up front
with a SchemaError naming the keyword, never silently loosened: numeric bounds, uniqueItems,
oneOf/allOf/not, if/then/else, patternProperties, recursive $ref, string formats.

Free-form values (a schema of `{}`, an object without properties, json_object mode) are any JSON
nested up to MAX_DEPTH levels: a regular language cannot count brackets without a bound.
"""
from __future__ import annotations

import json

from lmforge.errors import LmforgeError
from lmforge.serve.grammar.regex import (
    EMPTY,
    Alt,
    Cat,
    Chars,
    RegexError,
    Repeat,
    literal,
    negate,
    parse,
)

MAX_DEPTH = 3
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "$defs", "definitions", "additionalProperties", "strict"}
SUPPORTED = {"type", "properties", "required", "items", "minItems", "maxItems", "enum", "const", "anyOf",
             "pattern", "minLength", "maxLength", "$ref"} | ANNOTATIONS
MAX_ITEMS_BOUND = 32


class SchemaError(LmforgeError):
    """A schema (or part of one) that constrained decoding does not support."""


# JSON-string content: any character but '"', '\\' and controls, or an escape sequence.
SAFE = negate([(0, 31), (34, 34), (92, 92)])
HEX = Chars(((48, 57), (65, 70), (97, 102)))
ESCAPE = Cat((literal("\\"), Alt((Chars(((34, 34), (47, 47), (92, 92), (98, 98), (102, 102), (110, 110),
                                           (114, 114), (116, 116))),
                                    Cat((literal("u"), HEX, HEX, HEX, HEX))))))
STRING_CHAR = Alt((Chars(SAFE), ESCAPE))
QUOTE = literal('"')
STRING = Cat((QUOTE, Repeat(STRING_CHAR, 0, None), QUOTE))
DIGITS = Repeat(Chars(((48, 57),)), 1, None)
INTEGER = Cat((Repeat(literal("-"), 0, 1), Alt((literal("0"), Cat((Chars(((49, 57),)), Repeat(Chars(((48, 57),)), 0, None)))))))
NUMBER = Cat((INTEGER, Repeat(Cat((literal("."), DIGITS)), 0, 1),
              Repeat(Cat((Chars(((69, 69), (101, 101))), Repeat(Chars(((43, 43), (45, 45))), 0, 1), DIGITS)), 0, 1)))
SPACE = Repeat(literal(" "), 0, 1)
COLON = Cat((literal(":"), SPACE))
COMMA = Cat((literal(","), SPACE))
PRIMITIVES = {"string": STRING, "number": NUMBER, "integer": INTEGER, "boolean": Alt((literal("true"), literal("false"))),
              "null": literal("null")}


def _separated(item, lo: int = 0, hi: int | None = None):
    """item (',' item)* with lo..hi items."""
    if hi == 0:
        return EMPTY
    more = Repeat(Cat((COMMA, item)), max(lo - 1, 0), None if hi is None else hi - 1)
    body = Cat((item, more))
    return body if lo >= 1 else Repeat(body, 0, 1)


def any_json(depth: int = MAX_DEPTH, object_only: bool = False):
    """Any JSON value nested at most `depth` containers deep."""
    inner = any_json(depth - 1) if depth > 1 else None
    if inner is None:
        obj = literal("{}")
        arr = literal("[]")
    else:
        obj = Cat((literal("{"), _separated(Cat((STRING, COLON, inner))), literal("}")))
        arr = Cat((literal("["), _separated(inner), literal("]")))
    if object_only:
        return obj
    return Alt((*PRIMITIVES.values(), obj, arr))


def _literal_json(value):
    return literal(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


class _Compiler:
    def __init__(self, root: dict):
        self.root = root
        self.resolving: list[str] = []

    def resolve(self, ref) -> dict:
        if not isinstance(ref, str):
            raise SchemaError("$ref must be a string")
        for prefix in ("#/$defs/", "#/definitions/"):
            if ref.startswith(prefix):
                table = self.root.get(prefix[2:-1])
                table = table if isinstance(table, dict) else {}
                name = ref[len(prefix):]
                if name in table:
                    return table[name]
        if ref == "#":
            return self.root
        raise SchemaError(f"$ref {ref!r}: only local references to #/$defs/... are supported")

    def value(self, schema, where: str):
        if schema is True or schema == {}:
            return any_json()
        if schema is False:
            raise SchemaError(f"{where}: a schema of false matches nothing")
        if not isinstance(schema, dict):
            raise SchemaError(f"{where}: a schema must be an object or a boolean")
        unknown = sorted(set(schema) - SUPPORTED)
        if unknown:
            raise SchemaError(f"{where}: unsupported JSON Schema keyword(s) {', '.join(map(repr, unknown))}")
        if "$ref" in schema:
            ref = schema["$ref"]
            if not isinstance(ref, str):
                raise SchemaError(f"{where}: $ref must be a string")
            if ref in self.resolving:
                raise SchemaError(f"{where}: recursive $ref {ref!r} is not supported")
            self.resolving.append(ref)
            try:
                return self.value(self.resolve(ref), ref)
            finally:
                self.resolving.pop()
        if "const" in schema:
            return _literal_json(schema["const"])
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}: enum must be a non-empty list")
            return Alt(tuple(_literal_json(v) for v in values))
        if "anyOf" in schema:
            branches = schema["anyOf"]
            if not isinstance(branches, list) or not branches:
                raise SchemaError(f"{where}: anyOf must be a non-empty list")
            rest = {k: v for k, v in schema.items() if k not in ANNOTATIONS and k != "anyOf"}
            if rest:
                raise SchemaError(f"{where}: anyOf together with {sorted(rest)} is not supported")
            return Alt(tuple(self.value(b, f"{where}.anyOf[{i}]") for i, b in enumerate(branches)))
        kind = schema.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if kind else None
        if kinds is None:
            if "properties" in schema:
                kinds = ["object"]
            elif "items" in schema:
                kinds = ["array"]
            else:
                return any_json()
        unknown_types = [k for k in kinds if k not in ("object", "array", *PRIMITIVES)]
        if unknown_types:
            raise SchemaError(f"{where}: unknown type {unknown_types[0]!r}")
        out = [self.typed(schema, k, where) for k in kinds]
        return out[0] if len(out) == 1 else Alt(tuple(out))

    def typed(self, schema: dict, kind: str, where: str):
        if kind == "object":
            return self.object(schema, where)
        if kind == "array":
            return self.array(schema, where)
        if kind == "string":
            return self.string(schema, where)
        return PRIMITIVES[kind]

    def object(self, schema: dict, where: str):
        props = schema.get("properties")
        if not props:
            if schema.get("required"):
                raise SchemaError(f"{where}: required properties need a 'properties' entry")
            return any_json(object_only=True)
        if not isinstance(props, dict):
            raise SchemaError(f"{where}: properties must be an object")
        required = schema.get("required") or []
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"{where}: required must be a list of property names")
        required = set(required)
        missing = required - set(props)
        if missing:
            raise SchemaError(f"{where}: required {sorted(missing)} not in properties")
        items = [(Cat((_literal_json(name), COLON, self.value(sub, f"{where}.{name}"))), name in required)
                 for name, sub in props.items()]
        # after(i): properties i.. when one has been written already (each needs a leading comma);
        # first(i): properties i.. when none has been written yet.
        after = [EMPTY] * (len(items) + 1)
        first = [EMPTY] * (len(items) + 1)
        for i in range(len(items) - 1, -1, -1):
            prop, needed = items[i]
            with_it = Cat((COMMA, prop, after[i + 1]))
            after[i] = with_it if needed else Alt((with_it, after[i + 1]))
            start_here = Cat((prop, after[i + 1]))
            first[i] = start_here if needed else Alt((start_here, first[i + 1]))
        return Cat((literal("{"), first[0], literal("}")))

    def array(self, schema: dict, where: str):
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)) or lo < 0 or (hi is not None and hi < lo):
            raise SchemaError(f"{where}: minItems/maxItems must be integers with 0 <= minItems <= maxItems")
        if max(lo, hi or 0) > MAX_ITEMS_BOUND:
            raise SchemaError(f"{where}: minItems/maxItems above {MAX_ITEMS_BOUND} are not supported")
        items = schema.get("items", True)
        if isinstance(items, list):
            raise SchemaError(f"{where}: tuple-style items (a list) are not supported")
        item = self.value(items, f"{where}[]")
        return Cat((literal("["), _separated(item, lo, hi), literal("]")))

    def string(self, schema: dict, where: str):
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        if not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)) or lo < 0 or (hi is not None and hi < lo):
            raise SchemaError(f"{where}: minLength/maxLength must be integers with 0 <= minLength <= maxLength")
        if "pattern" not in schema:
            if max(lo, hi or 0) > 1000:
                raise SchemaError(f"{where}: minLength/maxLength above 1000 are not supported")
            return Cat((QUOTE, Repeat(STRING_CHAR, lo, hi), QUOTE))
        if "minLength" in schema or "maxLength" in schema:
            raise SchemaError(f"{where}: pattern together with minLength/maxLength is not supported")
        return Cat((QUOTE, string_pattern(schema["pattern"], where), QUOTE))


def string_pattern(pattern, where: str = "pattern"):
    """A JSON Schema `pattern` (a search, anchored only by ^ and $) over a string's JSON text.

    The pattern's character sets are cut down to characters that JSON writes unescaped."""
    if not isinstance(pattern, str):
        raise SchemaError(f"{where}: pattern must be a string")
    body, anchored_start, anchored_end = pattern, pattern.startswith("^"), pattern.endswith("$") and not pattern.endswith("\\$")
    body = body[1 if anchored_start else 0:len(body) - (1 if anchored_end else 0)]
    try:
        node = parse(body, restrict=SAFE)
    except RegexError as e:
        raise SchemaError(f"{where}: {e}") from e
    if isinstance(node, Alt) and (anchored_start != anchored_end):
        raise SchemaError(f"{where}: a top-level '|' with a single anchor is not supported; add parentheses")
    free = Repeat(Chars(SAFE), 0, None)
    return Cat(((EMPTY if anchored_start else free), node, (EMPTY if anchored_end else free)))


def schema_to_ast(schema):
    try:
        return _Compiler(schema if isinstance(schema, dict) else {}).value(schema, "schema")
    except RecursionError as e:
        raise SchemaError("schema: nested too deeply") from e
    except (TypeError, AttributeError, ValueError) as e:  # a keyword holding the wrong kind of value
        raise SchemaError(f"schema: malformed ({e})") from e
