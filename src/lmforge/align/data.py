"""Finetuning data: chats tokenised with a byte-exact assistant mask, the default SFT pairs from
the stdlib (signature + docstring -> body, found with `ast`), and users' JSONL files.

The mask comes from the tokenizer's own chat template: each assistant message's character span
in the rendered chat is found by rendering the conversation up to it (with the generation prompt)
and checking that its content follows verbatim, then the end-of-turn token the template writes
right after it joins the span. The chat is tokenised piece by piece at those boundaries, so no
BPE merge crosses them: the prompt tokens are exactly what the model sees at inference
(`encode_chat(..., add_generation_prompt=True)`), and the trained tokens decode to exactly the
assistant contents and their end-of-turn markers.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from lmforge.corpus.stdlib import stdlib_documents
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import render_chat_parts
from lmforge.tokenizer.tokenizer import IM_END
from lmforge.train.epoch_loader import jsonl_rows

PROMPT = "Write the body of this Python function.\n\n"


def assistant_spans(tok: Tokenizer, messages: list[dict]) -> list[tuple[int, int]]:
    """[(start, end)) character spans of the rendered chat to train on: each assistant message's
    content plus the end-of-turn token that follows it."""
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    ends = [t for t in (IM_END, tok.eos_token) if t and tok.hf.token_to_id(t) is not None]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        start = len(prefix)
        if not text.startswith(prefix) or not text.startswith(m["content"], start):
            raise LmforgeError(f"the chat template does not render assistant message {i} verbatim after its "
                               "prompt, so its tokens cannot be masked exactly")
        end = start + len(m["content"])
        eot = next((t for t in ends if text.startswith(t, end)), None)
        if eot is None:
            raise LmforgeError(f"the chat template writes no end-of-turn token ({' or '.join(ends)}) right after "
                               f"assistant message {i}")
        spans.append((start, end + len(eot)))
    return spans


def tokenize_chat(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """-> (token ids of the whole chat, trained flag per token: True on assistant tokens only)."""
    check_messages(messages)
    spans = assistant_spans(tok, messages)
    parts = render_chat_parts(tok.chat_template, messages, tok.special_tokens, add_generation_prompt=False,
                              bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    if "".join(text for text, _ in parts) != tok.apply_chat_template(messages, add_generation_prompt=False):
        raise LmforgeError("the chat template renders differently when messages hold special-token strings")
    cuts = sorted({b for span in spans for b in span})
    ids: list[int] = []
    trained: list[bool] = []
    pos = 0
    for text, control in parts:
        inside = [c for c in cuts if pos < c < pos + len(text)]
        if control and inside:
            raise LmforgeError(f"an assistant message boundary falls inside the special token {text!r}")
        bounds = [pos, *inside, pos + len(text)]
        for a, b in zip(bounds, bounds[1:]):
            piece = [tok.hf.token_to_id(text)] if control else tok.encode_text(text[a - pos:b - pos])
            ids += piece
            trained += [any(s <= a < e for s, e in spans)] * len(piece)
        pos += len(text)
    return ids, trained


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise LmforgeError("`messages` must be a non-empty list of {role, content}")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LmforgeError(f"each message needs a string 'role' and 'content', got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise LmforgeError("a chat without an assistant message has nothing to train on")


def read_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """Conversations from a JSONL file, one {"messages": [{role, content}, ...]} per line."""
    chats = []
    for n, row in jsonl_rows(path, "SFT data"):
        if not isinstance(row, dict) or "messages" not in row:
            raise LmforgeError(f"{path}:{n}: each line must be an object with `messages`")
        try:
            check_messages(row["messages"])
        except LmforgeError as e:
            raise LmforgeError(f"{path}:{n}: {e}") from e
        chats.append(row["messages"])
    if not chats:
        raise LmforgeError(f"{path}: no conversations")
    return chats


def function_pairs(source: str) -> Iterator[tuple[str, str]]:
    """(signature + docstring, body) of every function with a docstring and a body after it,
    dedented to the def's column. Functions whose lines cannot be dedented cleanly are skipped."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc, first = node.body[0], node.body[1]
        if ast.get_docstring(node) is None or first.lineno <= doc.end_lineno:
            continue
        col = node.col_offset
        chunk = lines[node.lineno - 1:node.end_lineno]
        if any(line[:col].strip() for line in chunk):
            continue
        chunk = [line[col:] if line.strip() else line.lstrip(" \t") for line in chunk]
        split = doc.end_lineno - node.lineno + 1
        header, body = "".join(chunk[:split]).rstrip("\n"), "".join(chunk[split:]).rstrip("\n")
        if body.strip():
            yield header, body


def function_chats(documents) -> Iterator[list[dict]]:
    """One user/assistant chat (signature + docstring -> body) per function in the documents."""
    for doc in documents:
        for header, body in function_pairs(doc.text):
            yield [{"role": "user", "content": PROMPT + header}, {"role": "assistant", "content": body}]


def stdlib_chats(split: str) -> Iterator[list[dict]]:
    """The default SFT data: one chat per stdlib function, on the corpus's split."""
    return function_chats(stdlib_documents(split))
