"""Tool calling for /v1/chat/completions: the grammar spec of a request's tools, and the parser
that turns generated <tool_call> blocks into OpenAI `tool_calls`, whole or as streamed deltas.

The parser reads text incrementally and is used for both answers, so a streamed answer's deltas
reassemble to exactly the non-streamed one. A reply that does not begin with `<tool_call>` is
plain content; in `auto` mode the grammar makes any reply that does begin with it a valid call.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

from lmforge.tokenizer.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

_HEAD = re.compile(r'\n\{"name": ?"((?:[^"\\]|\\.)*)", ?"arguments": ?(?=\{)')  # complete once the args begin
_TAIL = "}\n" + TOOL_CALL_CLOSE


def grammar_spec(tools: list[dict], choice, parallel: bool) -> tuple[str, dict] | None:
    """("tool_calls", spec) for lmforge.serve.grammar, or None when the model may not call tools."""
    if not tools or choice == "none":
        return None
    params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object", "properties": {}}
              for t in tools}
    name = choice if choice in ("auto", "required") else choice["function"]["name"]
    return ("tool_calls", {"tools": params, "choice": name, "parallel": parallel})


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ToolCallParser:
    """Feed generated text; get content text and tool-call events back as they become certain."""
    buffer: str = ""
    pos: int = 0
    mode: str = "detect"          # detect -> content | head -> args -> tail -> head ...
    calls: list[ToolCall] = field(default_factory=list)
    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    def feed(self, text: str, final: bool = False) -> list[tuple]:
        """-> events: ("content", text) | ("call", index, id, name) | ("args", index, text)."""
        self.buffer += text
        events: list[tuple] = []
        while True:
            before = (self.mode, self.pos)
            if self.mode == "detect":
                if self.buffer.startswith(TOOL_CALL_OPEN):
                    self.mode, self.pos = "head", len(TOOL_CALL_OPEN)
                elif final or not TOOL_CALL_OPEN.startswith(self.buffer):
                    self.mode = "content"
            elif self.mode == "content":
                if self.pos < len(self.buffer):
                    events.append(("content", self.buffer[self.pos:]))
                    self.pos = len(self.buffer)
            elif self.mode == "head":
                m = _HEAD.match(self.buffer, self.pos)
                if m:
                    call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", m.group(1))
                    self.calls.append(call)
                    events.append(("call", len(self.calls) - 1, call.id, call.name))
                    self.mode, self.pos, self.depth = "args", m.end(), 0
            elif self.mode == "args":
                start = self.pos
                while self.pos < len(self.buffer) and self.mode == "args":
                    self._scan(self.buffer[self.pos])
                    self.pos += 1
                if self.pos > start:
                    piece = self.buffer[start:self.pos]
                    self.calls[-1].arguments += piece
                    events.append(("args", len(self.calls) - 1, piece))
            elif self.mode == "tail":
                if self.buffer.startswith(_TAIL, self.pos):
                    self.pos += len(_TAIL)
                    self.mode = "between"
            elif self.mode == "between":
                if self.buffer.startswith("\n" + TOOL_CALL_OPEN, self.pos):
                    self.mode, self.pos = "head", self.pos + 1 + len(TOOL_CALL_OPEN)
            if (self.mode, self.pos) == before:
                return events

    def _scan(self, c: str) -> None:
        """Track JSON nesting through the arguments; the call's arguments end where it closes."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_string = False
        elif c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
        if self.depth == 0 and not self.in_string:
            self.mode = "tail"

    @property
    def called(self) -> bool:
        return bool(self.calls)


def parse_all(text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole reply -> (content or None, tool calls)."""
    parser = ToolCallParser()
    content = "".join(e[1] for e in parser.feed(text, final=True) if e[0] == "content")
    return (content if not parser.calls else None), parser.calls
