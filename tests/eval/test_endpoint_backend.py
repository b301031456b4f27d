"""The OpenAI-compatible endpoint backend against a small OpenAI-style server (written here, serving
the tiny model): echo+logprobs log-likelihoods equal the in-process ones; generation and chat work;
a server without prompt logprobs gives a clear error for log-likelihood tasks only."""
import socket
import threading
import time

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.eval.backend import GenerationRequest
from lmforge.eval.endpoint_backend import EndpointBackend
from lmforge.eval.runner import evaluate
from lmforge.eval.tasks import make_task

from .conftest import DATA

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


def openai_style_app(local, echo_supported=True):
    app = fastapi.FastAPI()
    model, tok = local.model, local.tok

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "tiny-llama", "object": "model"}]}

    @app.post("/v1/completions")
    def completions(body: dict):
        prompt = body["prompt"]
        if body.get("echo") and body.get("logprobs") is not None:
            if not echo_supported:
                return {"choices": [{"text": prompt, "logprobs": None}]}
            enc = tok.hf.encode(prompt, add_special_tokens=False)
            with torch.no_grad():
                logp = model(torch.tensor([enc.ids]))[0].double().log_softmax(-1)
            values, tops = [None], [None]
            for i in range(1, len(enc.ids)):
                values.append(float(logp[i - 1, enc.ids[i]]))
                best = int(logp[i - 1].argmax())
                tops.append({tok.decode([best]): float(logp[i - 1, best])})
            # like OpenAI's API: the prompt's tokens, then max_tokens generated ones (here a fake one)
            return {"choices": [{"text": prompt + " x", "logprobs": {
                "tokens": enc.tokens + [" x"], "token_logprobs": values + [-0.5], "top_logprobs": tops + [{" x": -0.5}],
                "text_offset": [start for start, _ in enc.offsets] + [len(prompt)]}}]}
        text, = local.generate([GenerationRequest(prompt, body.get("max_tokens", 16), body.get("temperature", 0.0),
                                                  stop=tuple(body.get("stop") or ()))])
        return {"choices": [{"text": text, "index": 0}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        text, = local.generate([GenerationRequest(body["messages"][-1]["content"], body.get("max_tokens", 16),
                                                  chat=True)])
        return {"choices": [{"message": {"role": "assistant", "content": text}}]}

    return app


class Server:
    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return f"http://127.0.0.1:{self.port}"
            time.sleep(0.02)
        raise RuntimeError("test server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(5)


PAIRS = [("Question: What is 2 + 2?\nAnswer:", " 4"), ("Question: What is 2 + 2?\nAnswer:", " blue"),
         ("A. red\nB. blue\nAnswer: ", "B"), ("The quick brown fox", " jumps over the lazy dog.")]


def test_echo_logprobs_equal_in_process_loglikelihood(tiny_backend):
    with Server(openai_style_app(tiny_backend)) as url:
        remote = EndpointBackend(url)
        assert remote.model == "tiny-llama"
        got = remote.loglikelihood(PAIRS)
    want = tiny_backend.loglikelihood(PAIRS)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(got, want):
        assert lp == pytest.approx(ref_lp, abs=1e-3)
        assert greedy == ref_greedy


def test_endpoint_runs_tasks_and_generation(tiny_backend, tmp_path):
    with Server(openai_style_app(tiny_backend)) as url:
        remote = EndpointBackend(url + "/v1")
        report = evaluate(remote, [make_task(f"arc:{DATA / 'arc_style.jsonl'}")], None, None, show_progress=False)
        local = evaluate(tiny_backend, [make_task(f"arc:{DATA / 'arc_style.jsonl'}")], None, None, show_progress=False)
        assert report["tasks"]["arc"]["metrics"] == local["tasks"]["arc"]["metrics"]
        text, chat = remote.generate([GenerationRequest("The quick brown", 12),
                                      GenerationRequest("Say hi", 8, chat=True)])
        want, want_chat = tiny_backend.generate([GenerationRequest("The quick brown", 12),
                                                 GenerationRequest("Say hi", 8, chat=True)])
        assert text == want and chat == want_chat


def test_endpoint_without_prompt_logprobs(tiny_backend):
    with Server(openai_style_app(tiny_backend, echo_supported=False)) as url:
        remote = EndpointBackend(url, model="tiny-llama")
        with pytest.raises(LmforgeError, match="does not return prompt logprobs"):
            remote.loglikelihood(PAIRS[:1])
        assert isinstance(remote.generate([GenerationRequest("Hello", 4)])[0], str)  # generation still works


def test_unreachable_endpoint_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LmforgeError, match="could not list models"):
        EndpointBackend(f"http://127.0.0.1:{port}")


def test_evaluates_lmforge_serve(tiny_backend):
    """Our own OpenAI-compatible server, end to end: generation tasks run through it and match the
    in-process backend (same weights, greedy), and so does log-likelihood from the prompt log-probs
    that `echo` returns."""
    from lmforge.serve.async_engine import AsyncEngine
    from lmforge.serve.engine import EngineConfig, LLMEngine
    from lmforge.serve.server import create_app

    engine = AsyncEngine(LLMEngine(tiny_backend.model, tiny_backend.tok, EngineConfig(kv_cache_mb=64)))
    try:
        with Server(create_app(engine, tiny_backend.tok, "tiny")) as url:
            remote = EndpointBackend(url)
            task = make_task(f"humaneval:{DATA / 'humaneval_style.jsonl'}", {"max_new_tokens": 24, "timeout": 3.0})
            served = evaluate(remote, [task], None, None, show_progress=False)["tasks"]["humaneval"]
            requests = [GenerationRequest(it["problem"]["prompt"], 24) for it in task.items()]
            assert remote.generate(requests) == tiny_backend.generate(requests)
            assert served["n"] == 4 and sum(served["details"]["statuses"].values()) == 4
            # the server returns prompt logprobs (echo): log-likelihood equals in-process scoring
            got = remote.loglikelihood(PAIRS)
            for (lp, greedy), (ref, ref_greedy) in zip(got, tiny_backend.loglikelihood(PAIRS)):
                assert lp == pytest.approx(ref, abs=1e-3) and greedy == ref_greedy
    finally:
        engine.shutdown()
