"""The engine on its own thread, fed by asyncio request handlers.

Handlers call `submit()` (from the event loop) and read RequestOutputs from an asyncio.Queue;
the engine thread owns the LLMEngine, drains a command queue (add / abort) between steps and
posts each step's outputs back with `loop.call_soon_threadsafe`. PyTorch releases the GIL inside
its kernels, so the event loop stays responsive while the model runs.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.serve.engine import LLMEngine
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.sequence import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The waiting queue is full (HTTP 429)."""


class GenerationFailed(Exception):
    """A request failed inside the engine (HTTP 500 for it alone, or an error event in its stream)."""


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int
    arrival: float
    last_token: float | None = None


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int = 256, metrics: ServeMetrics | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or ServeMetrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._sinks: dict[str, _Sink] = {}
        self._pending_adds = 0
        self._stop = False
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    # --- called from the event loop ---------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: asyncio.Queue, index: int = 0) -> str:
        """Queue a request; its outputs arrive on `sink` as (index, RequestOutput | Exception)."""
        self.engine.check_request(prompt_ids, params)  # LmforgeError -> 400, before taking a seat
        with self._lock:
            if self.engine.num_waiting + self._pending_adds >= self.max_queue:
                self.metrics.on_reject()
                raise Overloaded(f"the server is at capacity ({self.max_queue} requests waiting); retry later")
            self._pending_adds += 1
            request_id = uuid.uuid4().hex
            self._sinks[request_id] = _Sink(asyncio.get_running_loop(), sink, index, time.monotonic())
        self._commands.put(("add", request_id, prompt_ids, params))
        self._wake.set()
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request (client gone); its blocks are freed before the next step."""
        with self._lock:
            known = self._sinks.pop(request_id, None) is not None
        if known:
            self.metrics.on_cancel()
            self._commands.put(("abort", request_id))
            self._wake.set()

    @property
    def queue_depth(self) -> int:
        return self.engine.num_waiting + self._pending_adds

    def gauges(self) -> dict[str, tuple[str, float]]:
        e = self.engine
        return {
            "lmforge_queue_depth": ("Requests waiting to be scheduled.", self.queue_depth),
            "lmforge_running_requests": ("Requests being decoded.", e.num_running),
            "lmforge_kv_blocks_used": ("KV-cache blocks in use.", e.blocks.num_used),
            "lmforge_kv_blocks_total": ("KV-cache blocks in all.", e.blocks.num_blocks),
            "lmforge_prefix_cache_hit_tokens": ("Prompt tokens served from the prefix cache.", e.blocks.prefix_hits),
            "lmforge_preemptions": ("Sequences preempted for lack of KV blocks.", e.scheduler.num_preemptions),
        }

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    # --- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        # OpenMP thread counts are per calling thread: carry the creator's setting over.
        torch.set_num_threads(self._threads)
        while not self._stop:
            self._drain_commands()
            if not self.engine.has_work:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # never let one bad step kill the server: fail what was in flight
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            self._deliver(outputs)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, request_id, prompt_ids, params = cmd
                with self._lock:
                    self._pending_adds -= 1
                    sink = self._sinks.get(request_id)
                if sink is None:  # aborted before it was added
                    continue
                try:
                    self.engine.add_request(request_id, prompt_ids, params)
                except LmforgeError as e:
                    self._post(request_id, e, finished=True)
            else:
                self.engine.abort(cmd[1])

    def _post(self, request_id: str, item, finished: bool) -> None:
        with self._lock:
            sink = self._sinks.pop(request_id, None) if finished else self._sinks.get(request_id)
        if sink is not None:
            sink.loop.call_soon_threadsafe(sink.queue.put_nowait, (sink.index, item))
        return sink

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        self.metrics.on_tokens(now, len(outputs))
        for out in outputs:
            sink = self._post(out.request_id, out, out.finished)
            if sink is None:
                continue
            if sink.last_token is None:
                self.metrics.on_first_token(now - sink.arrival, out.prompt_tokens)
            else:
                self.metrics.on_inter_token(now - sink.last_token)
            sink.last_token = now
            if out.finished:
                self.metrics.on_finish(out.finish_reason or "stop", now - sink.arrival)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.seqs):
            self.engine.abort(request_id)
            self._post(request_id, GenerationFailed(f"engine error: {error}"), finished=True)


class Generation:
    """The sub-requests of one API call (n choices x prompts), read together as they stream.

    Submitting is all-or-nothing: if any sub-request is refused, the others are cancelled."""

    def __init__(self, engine: AsyncEngine, requests: list[tuple[list[int], SamplingParams]]):
        self.engine = engine
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_ids: list[str] = []
        self.unfinished = set(range(len(requests)))
        try:
            for index, (prompt_ids, params) in enumerate(requests):
                self.request_ids.append(engine.submit(prompt_ids, params, self.queue, index))
        except BaseException:
            self.cancel()
            raise

    async def stream(self):
        """Yield (choice index, RequestOutput) until every sub-request has finished.

        Cancelling the consumer (client disconnect) cancels every unfinished sub-request. A failed
        sub-request raises (LmforgeError: refused; GenerationFailed: failed while generating) and
        cancels the others of this call, never other calls' requests."""
        try:
            while self.unfinished:
                index, item = await self.queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.error is not None:
                    self.unfinished.discard(index)
                    raise GenerationFailed(item.error)
                if item.finished:
                    self.unfinished.discard(index)
                yield index, item
        finally:
            self.cancel()

    def cancel(self) -> None:
        for index, request_id in enumerate(self.request_ids):
            if index in self.unfinished:
                self.engine.abort(request_id)
