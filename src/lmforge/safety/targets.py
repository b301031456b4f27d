"""Where red-team prompts are sent: a model in this process, or any OpenAI-compatible endpoint.

A target answers `reply(messages) -> (text, blocked)`; `blocked` is True when a guard refused the
request (the in-process guard, or a server's 400 with code `guard_blocked`)."""
from __future__ import annotations

import httpx

from lmforge.errors import LmforgeError


class ModelTarget:
    """Greedy decoding with the model's chat template; optionally behind a guard, applied as the
    server applies it (input screened, reply filtered)."""

    def __init__(self, model, tokenizer, max_tokens: int = 64, guard=None):
        self.model, self.tok, self.max_tokens, self.guard = model, tokenizer, max_tokens, guard

    def reply(self, messages: list[dict]) -> tuple[str, bool]:
        from lmforge.model.sampling import generate
        if self.guard is not None:
            d = self.guard.check_messages(messages)
            if d.action == "block":
                return "", True
            messages = d.messages or messages
        ids = self.tok.encode_chat(messages)
        stops = self.tok.stop_ids()
        out = list(generate(self.model, ids, self.max_tokens, temperature=0.0, stop_ids=stops))
        text = self.tok.decode([t for t in out if t not in stops])
        return (self.guard.filter_output(text, messages) if self.guard is not None else text), False


class EndpointTarget:
    """POST /v1/chat/completions (temperature 0) to `url`; the model is the server's first unless named."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, max_tokens: int = 64,
                 timeout: float = 120.0):
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)
        self.max_tokens = max_tokens
        try:
            self.model = model or self.client.get(self.base + "/models").json()["data"][0]["id"]
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, KeyError, IndexError, TypeError) as e:
            raise LmforgeError(f"cannot list the models of {self.base}: {e}") from None

    def reply(self, messages: list[dict]) -> tuple[str, bool]:
        try:
            r = self.client.post(self.base + "/chat/completions", json={
                "model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens})
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise LmforgeError(f"the endpoint {self.base} failed: {e}") from None
        if r.status_code == 400 and (r.json().get("error") or {}).get("code") == "guard_blocked":
            return "", True
        if r.status_code != 200:
            raise LmforgeError(f"the endpoint answered {r.status_code}: {r.text[:200]}")
        return r.json()["choices"][0]["message"]["content"] or "", False
