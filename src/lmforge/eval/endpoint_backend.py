"""Any OpenAI-compatible server as a backend (our `lmforge serve`, vLLM, llama.cpp, ...).

Log-likelihood uses `/v1/completions` with `echo=true, logprobs=1, max_tokens=1`: the server
returns the log-probability of every prompt token, and the continuation's tokens are those whose
text offset lies past the context. Servers without echo support can still run generation tasks;
log-likelihood tasks then fail with a clear message. Requests run concurrently.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import httpx

from lmforge.errors import LmforgeError
from lmforge.eval.backend import BackendInfo, GenerationRequest, Progress
from lmforge.eval.stop_strings import truncate_at_stop


class EndpointBackend:
    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 300.0):
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        key = api_key or os.environ.get("OPENAI_API_KEY")
        self.client = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"} if key else {})
        self.concurrency = concurrency
        self.model = model or self._first_model()
        self.max_length = None
        self.info = BackendInfo("endpoint", self.model, {"url": self.base, "fingerprint": self.base})

    def _post(self, path: str, body: dict) -> dict:
        try:
            r = self.client.post(self.base + path, json=body)
        except httpx.HTTPError as e:
            raise LmforgeError(f"endpoint {self.base}: {e}") from e
        if r.status_code >= 400:
            raise LmforgeError(f"endpoint {self.base}{path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def _first_model(self) -> str:
        try:
            r = self.client.get(self.base + "/models")
            data = r.json().get("data") or []
            return data[0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            raise LmforgeError(f"endpoint {self.base}: could not list models ({e}); pass --endpoint-model") from e

    def _map(self, fn, items, progress: Progress):
        with ThreadPoolExecutor(self.concurrency) as pool:
            out = []
            for result in pool.map(fn, items):
                out.append(result)
                if progress:
                    progress(1)
        return out

    # --- log-likelihood ----------------------------------------------------------------------
    def _echo(self, prompt: str) -> dict:
        # max_tokens=1: many servers refuse 0; the one generated token lies past the prompt and is ignored
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        data = self._post("/completions", body)
        logprobs = (data.get("choices") or [{}])[0].get("logprobs")
        if not logprobs or not logprobs.get("token_logprobs") or logprobs.get("text_offset") is None:
            raise LmforgeError(f"endpoint {self.base} does not return prompt logprobs (echo=true, logprobs=1); "
                               "log-likelihood tasks need them — generation tasks still work")
        return logprobs

    def _score(self, pair: tuple[str, str]) -> tuple[float, bool]:
        context, continuation = pair
        boundary = len(context.rstrip())  # trailing context whitespace belongs to the continuation's tokens
        lp = self._echo(context + continuation)
        total, greedy = 0.0, True
        for i, offset in enumerate(lp["text_offset"]):
            if offset < boundary or offset >= len(context) + len(continuation):
                continue
            value = lp["token_logprobs"][i]
            if value is None:
                raise LmforgeError("endpoint returned no logprob for a continuation token")
            total += value
            top = (lp.get("top_logprobs") or [None] * (i + 1))[i] or {}
            greedy = greedy and (not top or value >= max(top.values()) - 1e-6)
        return total, greedy

    def loglikelihood(self, requests: list[tuple[str, str]], progress: Progress = None) -> list[tuple[float, bool]]:
        return self._map(self._score, requests, progress)

    def _rolling(self, text: str) -> tuple[float, int]:
        lp = self._echo(text)
        values = [v for v, offset in zip(lp["token_logprobs"], lp["text_offset"])
                  if v is not None and offset < len(text)]  # the first token has none; skip the generated one
        return float(sum(values)), len(values)

    def loglikelihood_rolling(self, texts: list[str], progress: Progress = None) -> list[tuple[float, int]]:
        return self._map(self._rolling, texts, progress)

    # --- generation --------------------------------------------------------------------------
    def _generate(self, r: GenerationRequest) -> str:
        common = {"model": self.model, "max_tokens": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p}
        if r.stop:
            common["stop"] = list(r.stop)[:4]  # the OpenAI API accepts at most four; the rest are applied here
        if r.seed is not None:
            common["seed"] = r.seed
        if r.chat:
            data = self._post("/chat/completions", {**common, "messages": [{"role": "user", "content": r.prompt}]})
            text = data["choices"][0]["message"]["content"] or ""
        else:
            text = self._post("/completions", {**common, "prompt": r.prompt})["choices"][0]["text"]
        return truncate_at_stop(text, r.stop)

    def generate(self, requests: list[GenerationRequest], progress: Progress = None) -> list[str]:
        return self._map(self._generate, requests, progress)
