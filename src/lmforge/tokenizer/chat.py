"""Chat templates are Jinja strings, as in Hugging Face tokenizer configs and GGUF metadata."""
from __future__ import annotations

import json
import re
import secrets
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import LmforgeError

# ChatML, the default for models trained here.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@lru_cache(maxsize=16)
def _compile(template: str):
    # Templates may come from untrusted model files: render them in Jinja's sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def _raise(message):
    raise LmforgeError(f"chat template: {message}")


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LmforgeError(f"chat messages need 'role' and 'content', got {m!r}")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
    except TemplateError as e:
        raise LmforgeError(f"chat template failed: {e}") from e


def render_chat_parts(template: str, messages: list[dict], special_tokens: list[str],
                      add_generation_prompt: bool = True, **extra) -> list[tuple[str, bool]]:
    """The rendered chat as (text, is_control) parts, where is_control marks a special token that
    the template itself wrote. Special-token strings inside the messages stay plain text.

    Each special-token string in a message is swapped for a unique placeholder before rendering,
    so any special token left in the rendered string came from the template; the placeholders are
    swapped back in the text parts afterwards."""
    specials = sorted({s for s in special_tokens if s}, key=len, reverse=True)
    if not specials:
        return [(render_chat(template, messages, add_generation_prompt, **extra), False)]
    find = re.compile("|".join(re.escape(s) for s in specials))
    holders = _placeholders(len(specials), [template, *_strings(messages), *_strings(extra)])
    to_holder = dict(zip(specials, holders))
    neutral = [_map_strings(m, lambda s: find.sub(lambda hit: to_holder[hit.group()], s)) for m in messages]
    rendered = render_chat(template, neutral, add_generation_prompt, **extra)
    back = re.compile("|".join(re.escape(h) for h in holders))
    to_special = dict(zip(holders, specials))
    parts, start = [], 0
    for hit in find.finditer(rendered):
        if hit.start() > start:
            parts.append((back.sub(lambda h: to_special[h.group()], rendered[start:hit.start()]), False))
        parts.append((hit.group(), True))
        start = hit.end()
    if start < len(rendered):
        parts.append((back.sub(lambda h: to_special[h.group()], rendered[start:]), False))
    return parts


def _placeholders(n: int, texts: list[str]) -> list[str]:
    """n strings found in none of `texts` (a random private-use-area tag; redrawn on a clash)."""
    while True:
        tag = "\U000F0000" + secrets.token_hex(8)
        if not any(tag in t for t in texts):
            return [f"{tag}:{i}\U000F0001" for i in range(n)]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _map_strings(value, fn):
    """`value` with fn applied to every string in it (through dicts and lists)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value


# --- tools ---------------------------------------------------------------------------------------------
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def tools_system_text(tools: list[dict]) -> str:
    """How the model is told about tools (the Hermes convention many open models are tuned on)."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to help with the user's request. The functions are listed "
            f"in <tools></tools> tags:\n<tools>\n{listed}\n</tools>\n\nTo call functions, reply only with one "
            f"{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} block per call, each holding a JSON object with the function "
            f"name and its arguments:\n{TOOL_CALL_OPEN}\n{{\"name\": <function-name>, \"arguments\": "
            f"<args-json-object>}}\n{TOOL_CALL_CLOSE}")


def tool_chat_messages(messages: list[dict], tools: list[dict] | None, template: str) -> list[dict]:
    """Messages with tool use spelled out for any chat template: the tool list joins the system
    message; an assistant's earlier calls become their <tool_call> blocks; a `tool` message becomes
    a <tool_response> turn (role `tool` where the template knows it, else `user`)."""
    out = [dict(m) for m in messages]
    if tools:
        text = tools_system_text(tools)
        if out and out[0].get("role") == "system":
            out[0]["content"] = f"{out[0].get('content') or ''}\n\n{text}".lstrip()
        else:
            out.insert(0, {"role": "system", "content": text})
    tool_role = "tool" if "tool" in template else "user"
    for m in out:
        calls = m.pop("tool_calls", None)
        if m.get("role") == "assistant" and calls:
            blocks = [f"{TOOL_CALL_OPEN}\n" + json.dumps({"name": c["function"]["name"],
                                                         "arguments": _arguments(c["function"].get("arguments"))},
                                                        ensure_ascii=False) + f"\n{TOOL_CALL_CLOSE}" for c in calls]
            m["content"] = "\n".join(filter(None, [m.get("content") or "", *blocks]))
        if m.get("role") == "tool":
            m.pop("tool_call_id", None)
            m["role"] = tool_role
            m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
        m["content"] = m.get("content") or ""
    return out


def _arguments(raw):
    """A call's arguments as sent back by the client: usually a JSON string; kept as text if not JSON."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw if raw is not None else {}
