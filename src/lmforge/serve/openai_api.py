"""/v1/chat/completions and /v1/completions: OpenAI request and response shapes, SSE streaming.

A request becomes one engine request per (prompt, choice). Streaming answers are Server-Sent
Events (`data: {chunk}` ... `data: [DONE]`); a client that goes away, streaming or not, has its
requests cancelled and their KV blocks freed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmforge.errors import LmforgeError
from lmforge.serve.async_engine import Generation, GenerationFailed
from lmforge.serve.grammar import compile_grammar
from lmforge.serve.prompt_logprobs import prompt_logprobs
from lmforge.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from lmforge.serve.sequence import RequestOutput, TokenLogprob
from lmforge.serve.tools import ToolCallParser
from lmforge.serve.tools import grammar_spec as tool_grammar_spec
from lmforge.serve.tools import parse_all as parse_tool_calls
from lmforge.tokenizer.chat import tool_chat_messages

router = APIRouter()
log = logging.getLogger(__name__)


# --- shared plumbing -----------------------------------------------------------------------------
def _state(request: Request):
    return request.app.state.lmforge


def _check_model(state, name: str) -> None:
    if name not in state.model_names:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


def _max_tokens(state, prompt_len: int, requested: int | None) -> int:
    room = state.engine.engine.max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"this model's maximum context length is {state.engine.engine.max_model_len} tokens; "
                            f"the prompt has {prompt_len}", param="messages", code="context_length_exceeded")
    return requested if requested is not None else min(state.default_max_tokens, room)


def _screen(state, messages: list[dict]) -> list[dict]:
    """The guard's input check (when the server runs one): a blocked request is a 400 with code
    `guard_blocked`; a redacted one goes on with the offending text cut out."""
    if state.guard is None:
        return messages
    decision = state.guard.check_messages(messages)
    if decision.action == "block":
        raise APIError(400, f"the request was blocked by the server's guard ({decision.reason})",
                       param="messages", code="guard_blocked")
    return decision.messages or messages


def _output_filters(state, messages: list[dict], n: int) -> list | None:
    return None if state.guard is None else [state.guard.output_stream(messages) for _ in range(n)]


async def _grammar(state, spec, param: str = "response_format"):
    """The compiled grammar for a response_format (cached), or None; unsupported schemas are a 400."""
    if spec is None:
        return None
    try:
        return await asyncio.to_thread(compile_grammar, spec, state.tokenizer, state.engine.engine.vocab_size)
    except LmforgeError as e:
        raise APIError(400, str(e), param=param) from e


def _start(state, requests) -> Generation:
    try:
        return Generation(state.engine, requests)
    except LmforgeError as e:
        code = "context_length_exceeded" if "context length" in str(e) else None
        raise APIError(400, str(e), code=code) from e


async def _collect(request: Request, gen: Generation) -> dict[int, list[RequestOutput]]:
    """Run a non-streaming generation to the end, cancelling it if the client disconnects."""
    async def consume():
        outs: dict[int, list[RequestOutput]] = {}
        try:
            async for index, out in gen.stream():
                outs.setdefault(index, []).append(out)
        finally:
            gen.cancel()
        return outs

    task = asyncio.create_task(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _guarded(events, gen: Generation):
    """A stream that always ends properly: a failure mid-stream (this request's alone) becomes an
    OpenAI-style error event followed by [DONE]; a client that goes away has its requests freed."""
    try:
        async for event in events:
            yield event
    except LmforgeError as e:
        yield _sse(APIError(400, str(e)).body())
        yield "data: [DONE]\n\n"
    except GenerationFailed as e:
        yield _sse(APIError(500, str(e), "server_error", code="generation_failed").body())
        yield "data: [DONE]\n\n"
    except Exception:
        log.exception("stream failed")
        yield _sse(APIError(500, "internal server error", "server_error").body())
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()


def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _totals(final: dict[int, RequestOutput], n: int) -> dict:
    prompt = sum(o.prompt_tokens for i, o in final.items() if i % n == 0)  # each prompt counted once
    cached = sum(o.cached_tokens for i, o in final.items() if i % n == 0)
    return _usage(prompt, sum(o.completion_tokens for o in final.values()), cached)


def _token_text(tok, token_id: int) -> tuple[str, list[int]]:
    text = tok.decode([token_id])
    raw = tok.token_bytes_table[token_id] if tok.byte_level else text.encode("utf-8")
    return text, list(raw)


def _chat_logprobs(tok, lps: list[TokenLogprob]) -> dict:
    def entry(token_id, lp):
        text, raw = _token_text(tok, token_id)
        return {"token": text, "logprob": lp, "bytes": raw}
    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in lps]}


def _top_dict(tok, top: list[tuple[int, float]]) -> dict[str, float]:
    """Alternatives keyed by text, most likely first; tokens that decode alike (e.g. halves of a
    UTF-8 character) keep the likeliest one's value, so the maximum is always the top token's."""
    out: dict[str, float] = {}
    for i, v in top:
        out.setdefault(_token_text(tok, i)[0], v)
    return out


def _completion_logprobs(tok, lps: list[TokenLogprob], offset: int) -> dict:
    tokens, offsets = [], []
    for lp in lps:
        tokens.append(_token_text(tok, lp.token_id)[0])
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [_top_dict(tok, lp.top) for lp in lps],
            "text_offset": offsets}


# --- chat ------------------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = _state(request)
    _check_model(state, body.model)
    choice = body.tool_choice_value()
    tools = body.tool_dicts() if choice != "none" else []
    messages = _screen(state, [m.for_template() for m in body.messages])
    try:  # only the template inserts special tokens; what users typed stays text
        if tools or any(m["role"] == "tool" or "tool_calls" in m for m in messages):
            messages = tool_chat_messages(messages, tools, state.tokenizer.chat_template or "")
        prompt_ids = state.tokenizer.encode_chat(messages)
    except LmforgeError as e:
        raise APIError(400, str(e), param="messages") from e
    max_tokens = _max_tokens(state, len(prompt_ids), body.requested_max_tokens())
    grammar = await _grammar(state, tool_grammar_spec(tools, choice, body.parallel_tool_calls) or body.grammar_spec(),
                             "tools" if tools else "response_format")
    gen = _start(state, [(prompt_ids, body.sampling_params(max_tokens, body.logprobs_k(), i, grammar))
                         for i in range(body.n)])
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": rid, "created": created, "model": body.model, "system_fingerprint": None}
    if body.stream:
        return StreamingResponse(_guarded(_chat_events(state, body, gen, base, bool(tools),
                                                       _output_filters(state, messages, body.n)), gen),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    outs = await _collect(request, gen)
    choices = []
    for i in range(body.n):
        parts = outs.get(i, [])
        lps = [lp for o in parts for lp in o.logprobs]
        text = "".join(o.text for o in parts)
        text = text if state.guard is None else state.guard.filter_output(text, messages)
        message = {"role": "assistant", "content": text}
        finish = parts[-1].finish_reason if parts else "stop"
        if tools:
            content, calls = parse_tool_calls(text)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in calls]}
                finish = "tool_calls" if finish == "stop" else finish
        choices.append({"index": i, "message": message,
                        "logprobs": _chat_logprobs(state.tokenizer, lps) if body.logprobs else None,
                        "finish_reason": finish})
    usage = _totals({i: v[-1] for i, v in outs.items() if v}, body.n)
    return JSONResponse({**base, "object": "chat.completion", "choices": choices, "usage": usage})


def _tool_deltas(events: list[tuple]) -> tuple[str, list[dict]]:
    """Parser events -> (content text, tool_calls delta entries)."""
    content, calls = "", []
    for e in events:
        if e[0] == "content":
            content += e[1]
        elif e[0] == "call":
            calls.append({"index": e[1], "id": e[2], "type": "function", "function": {"name": e[3], "arguments": ""}})
        else:
            calls.append({"index": e[1], "function": {"arguments": e[2]}})
    return content, calls


async def _chat_events(state, body: ChatCompletionRequest, gen: Generation, base: dict, tools: bool = False,
                       filters=None):
    chunk = {**base, "object": "chat.completion.chunk"}
    for i in range(body.n):
        yield _sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]})
    final: dict[int, RequestOutput] = {}
    parsers = {i: ToolCallParser() for i in range(body.n)} if tools else {}
    async for i, out in gen.stream():
        text = out.text
        if filters is not None:  # the guard holds back text that could still become PII or a leak
            text = filters[i].feed(text) + (filters[i].finish() if out.finished else "")
        lp = _chat_logprobs(state.tokenizer, out.logprobs) if body.logprobs and out.logprobs else None
        if tools:
            content, calls = _tool_deltas(parsers[i].feed(text, final=out.finished))
            delta = ({"content": content} if content else {}) | ({"tool_calls": calls} if calls else {})
            if delta or lp:
                yield _sse({**chunk, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": None}]})
        elif text or out.logprobs:
            yield _sse({**chunk, "choices": [{"index": i, "delta": {"content": text}, "logprobs": lp,
                                              "finish_reason": None}]})
        if out.finished:
            final[i] = out
            reason = out.finish_reason
            if tools and parsers[i].called and reason == "stop":
                reason = "tool_calls"
            yield _sse({**chunk, "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}]})
    if body.stream_options and body.stream_options.include_usage:
        yield _sse({**chunk, "choices": [], "usage": _totals(final, body.n)})
    yield "data: [DONE]\n\n"


# --- completions -----------------------------------------------------------------------------------
def _char_offsets(tok, ids: list[int]) -> list[int]:
    """Character offset where each token's text starts in the decoded sequence (UTF-8 aware: a
    token that ends inside a character does not move the offset until the character completes)."""
    if not tok.byte_level:
        out, n = [], 0
        for i in ids:
            out.append(n)
            n += len(tok.decode([i]))
        return out
    table, out, chars = tok.token_bytes_table, [], 0
    for i in ids:
        out.append(chars)
        chars += sum(1 for b in table[i] if b & 0xC0 != 0x80)  # count each character at its lead byte
    return out


def _echo_logprobs(tok, ids: list[int], lps: list) -> dict:
    """The prompt's part of a completions `logprobs` object: null for the first token."""
    return {"tokens": [_token_text(tok, i)[0] for i in ids],
            "token_logprobs": [lp.logprob if lp else None for lp in lps],
            "top_logprobs": [_top_dict(tok, lp.top) if lp else None for lp in lps],
            "text_offset": _char_offsets(tok, ids)}


def _join_logprobs(first: dict | None, second: dict) -> dict:
    if first is None:
        return second
    return {key: first[key] + second[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = _state(request)
    _check_model(state, body.model)
    tok = state.tokenizer
    prompts = body.prompts()
    # the guard reads each text prompt as one untrusted user message
    prompts = [_screen(state, [{"role": "user", "content": p}])[0]["content"] if isinstance(p, str) else p
               for p in prompts]
    # A text prompt is text even when it spells a special token; send token ids to use specials.
    encoded = [tok.encode_text(p) if isinstance(p, str) else list(p) for p in prompts]
    if any(not ids for ids in encoded):
        raise APIError(400, "a prompt encodes to no tokens", param="prompt")
    vocab = state.engine.engine.vocab_size
    if any(not 0 <= t < vocab for ids in encoded for t in ids):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    grammar = await _grammar(state, body.grammar_spec())
    requests, texts, echoed = [], [], []
    for p, ids in zip(prompts, encoded):
        if body.max_tokens == 0:  # score the prompt only: nothing for the engine to generate
            if len(ids) > state.engine.engine.max_model_len:
                raise APIError(400, f"this model's maximum context length is {state.engine.engine.max_model_len} "
                                    f"tokens; the prompt has {len(ids)}", param="prompt", code="context_length_exceeded")
        else:
            max_tokens = _max_tokens(state, len(ids), body.max_tokens)
        prompt_lp = None
        if body.echo and body.logprobs is not None:
            lps = await asyncio.to_thread(prompt_logprobs, state.engine.engine.model, ids, body.logprobs)
            prompt_lp = _echo_logprobs(tok, ids, lps)
        for c in range(body.n):
            if body.max_tokens:
                requests.append((ids, body.sampling_params(max_tokens, body.logprobs, c, grammar)))
            texts.append(p if isinstance(p, str) else tok.decode(ids) if body.echo else "")
            echoed.append(prompt_lp)
    gen = _start(state, requests)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
            "system_fingerprint": None}
    if body.stream:
        return StreamingResponse(_guarded(_completion_events(state, body, gen, base, texts, echoed, encoded,
                                                             _output_filters(state, [], len(texts))), gen),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    outs = await _collect(request, gen)
    choices = []
    for i in range(len(texts)):
        parts = outs.get(i, [])
        text = "".join(o.text for o in parts)
        text = text if state.guard is None else state.guard.filter_output(text, [])
        lps = [lp for o in parts for lp in o.logprobs]
        logprobs = None
        if body.logprobs is not None:
            start = len(texts[i]) if body.echo else 0
            logprobs = _join_logprobs(echoed[i], _completion_logprobs(tok, lps, start))
        choices.append({"index": i, "text": (texts[i] if body.echo else "") + text, "logprobs": logprobs,
                        "finish_reason": parts[-1].finish_reason if parts else "length"})
    if body.max_tokens:
        usage = _totals({i: v[-1] for i, v in outs.items() if v}, body.n)
    else:
        usage = _usage(sum(len(ids) for ids in encoded), 0, 0)
    return JSONResponse({**base, "choices": choices, "usage": usage})


async def _completion_events(state, body: CompletionRequest, gen: Generation, base: dict, texts: list[str],
                             echoed: list, encoded: list[list[int]], filters=None):
    offsets = [len(t) if body.echo else 0 for t in texts]
    if body.echo:
        for i, text in enumerate(texts):
            done = not body.max_tokens
            yield _sse({**base, "choices": [{"index": i, "text": text, "logprobs": echoed[i],
                                             "finish_reason": "length" if done else None}]})
    final: dict[int, RequestOutput] = {}
    async for i, out in gen.stream():
        lp = None
        if body.logprobs is not None:
            lp = _completion_logprobs(state.tokenizer, out.logprobs, offsets[i])
        offsets[i] += len(out.text)
        text = out.text
        if filters is not None:
            text = filters[i].feed(text) + (filters[i].finish() if out.finished else "")
        if out.finished:
            final[i] = out
        if text or out.finished or lp:
            yield _sse({**base, "choices": [{"index": i, "text": text, "logprobs": lp,
                                             "finish_reason": out.finish_reason if out.finished else None}]})
    if body.stream_options and body.stream_options.include_usage:
        usage = _totals(final, body.n) if body.max_tokens else _usage(sum(len(ids) for ids in encoded), 0, 0)
        yield _sse({**base, "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"
