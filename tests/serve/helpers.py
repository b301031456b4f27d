"""Shared test helpers: a tiny random model with SmolLM2's tokenizer, and uvicorn in a thread."""
from __future__ import annotations

import socket
import threading
import time

import torch
import uvicorn

from lmforge.model import ModelConfig, Transformer


def tiny_model(vocab_size: int, seed: int = 0, max_seq_len: int = 512) -> Transformer:
    """A 2-layer random model: gibberish, but exercises every code path quickly."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      max_seq_len=max_seq_len, tie_embeddings=True)
    return Transformer(cfg).eval()


class ServerThread:
    """uvicorn serving `app` on a free loopback port, in a background thread."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="error", lifespan="off", timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class RunningServer:
    """An engine + app + uvicorn thread for one model, shut down on exit."""

    def __init__(self, model, tokenizer, name="test-model", engine_config=None, max_queue=256, **app_kwargs):
        from lmforge.serve.async_engine import AsyncEngine
        from lmforge.serve.engine import EngineConfig, LLMEngine
        from lmforge.serve.server import create_app
        self.engine = AsyncEngine(LLMEngine(model, tokenizer, engine_config or EngineConfig(kv_cache_mb=64)),
                                  max_queue=max_queue)
        self.app = create_app(self.engine, tokenizer, name, **app_kwargs)
        self.thread = ServerThread(self.app)
        self.name = name

    def __enter__(self) -> "RunningServer":
        self.thread.__enter__()
        self.url = self.thread.url
        return self

    def __exit__(self, *exc) -> None:
        self.thread.__exit__(*exc)
        self.engine.shutdown()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once no request is queued or running and every KV block is free."""
        e = self.engine.engine
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not e.has_work and e.blocks.num_used == 0 and self.engine.queue_depth == 0:
                return True
            time.sleep(0.02)
        return False
