"""The HTTP server: FastAPI app with the OpenAI routes, /v1/models, /health, /metrics and the
web chat page at /. Every error is OpenAI-style JSON with a 4xx/5xx status, never a traceback."""
from __future__ import annotations

import errno
import hmac
import logging
import socket
import time
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LmforgeError
from lmforge.serve.async_engine import AsyncEngine, GenerationFailed, Overloaded
from lmforge.serve.openai_api import router
from lmforge.serve.protocol import APIError

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: object
    model_name: str
    api_key: str | None = None
    default_max_tokens: int = 512
    max_body_bytes: int = 1 << 20
    created: int = 0
    guard: object | None = None  # lmforge.safety.guard.Guard: screens input, filters output

    @property
    def model_names(self) -> set[str]:
        return {self.model_name}


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type_, param, code).body(), status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


class GuardMiddleware:
    """API-key check on /v1 and a body-size limit, as plain ASGI middleware (Starlette's
    BaseHTTPMiddleware would hide client disconnects from the handlers)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            error = self._check(scope)
            if error is not None:
                await error(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["path"].startswith("/v1/") and self.state.api_key:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.state.api_key}".encode()):
                return _error(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                              "authentication_error", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.state.max_body_bytes):
            return _error(413, f"the request body is larger than {self.state.max_body_bytes} bytes")
        return None


def create_app(engine: AsyncEngine, tokenizer, model_name: str, api_key: str | None = None,
               default_max_tokens: int = 512, max_body_bytes: int = 1 << 20, guard=None) -> FastAPI:
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmforge = state = ServerState(engine, tokenizer, model_name, api_key, default_max_tokens,
                                            max_body_bytes, int(time.time()), guard)
    if guard is not None:  # every guard decision counted in /metrics by its main reason
        guard.listeners.append(lambda d: engine.metrics.on_guard(d.direction, d.action, d.reason))
    app.include_router(router)

    app.add_middleware(GuardMiddleware, state=state)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc: RequestValidationError):
        return _error(400, _validation_message(exc))

    @app.exception_handler(APIError)
    async def on_api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Overloaded)
    async def on_overload(request, exc: Overloaded):
        return _error(429, str(exc), "rate_limit_error", code="server_overloaded")

    @app.exception_handler(GenerationFailed)
    async def on_generation_failed(request, exc: GenerationFailed):  # this request alone failed
        return _error(500, str(exc), "server_error", code="generation_failed")

    @app.exception_handler(LmforgeError)
    async def on_user_error(request, exc: LmforgeError):
        return _error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def on_crash(request, exc: Exception):
        log.exception("unhandled error")
        return _error(500, "internal server error", "server_error")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(resources.files("lmforge.serve").joinpath("static/chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        alive = engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped", "model": model_name},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(engine.gauges()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": state.created, "owned_by": "lmforge",
                "max_model_len": engine.engine.max_model_len}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name not in state.model_names:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return model_card()

    return app


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket now, so a busy port or a bad address is a one-line error before
    the model loads and before "serving on" is printed (uvicorn would only log it and exit)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise LmforgeError(f"cannot listen on {host}:{port}: unknown host ({e})") from e
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        reason = "the port is already in use" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise LmforgeError(f"cannot listen on {host}:{port}: {reason}") from e
    sock.set_inheritable(True)
    return sock


def run_on_socket(app: FastAPI, sock: socket.socket) -> None:
    """Serve `app` with uvicorn on an already bound socket until interrupted."""
    import uvicorn
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
