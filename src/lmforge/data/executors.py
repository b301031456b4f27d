"""Executors run a pure function over a stream of work items and hand back the results *in input
order*, which is why every engine produces byte-identical outputs.

- `LocalExecutor`: a multiprocessing pool on this machine (the default); workers=1 runs in-process.
- `RayExecutor`: Ray tasks on a local Ray instance or a cluster (`address`); each node needs
  lmforge installed and the output directory on a shared filesystem.

`open(context)` starts the workers and ships the context (configuration, eval n-gram index, ...)
once per worker; `map(fn, items)` then calls `fn(context, item)` for each item, with at most two
items per worker in flight, so memory stays bounded however long the stream is; `close()` stops
the workers.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from lmforge.errors import LmforgeError


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


_CONTEXT = None


def _set_context(context) -> None:
    global _CONTEXT
    _CONTEXT = context


def _call_with_context(fn: Callable, item):
    return fn(_CONTEXT, item)


class LocalExecutor:
    """Start method 'auto' is fork on Linux (fast, and it works from scripts without a
    `__main__` guard) unless `safe_start` asks for a clean interpreter (forkserver), as needed
    when workers use torch after the parent has (an HF toxicity model)."""
    name = "local"

    def __init__(self, workers: int = 0, start_method: str = "auto", safe_start: bool = False):
        self.workers = workers or available_cpus()
        self.start_method, self.safe_start = start_method, safe_start
        self.pool = None
        self.context = None

    def _method(self) -> str:
        methods = mp.get_all_start_methods()
        if self.start_method != "auto":
            if self.start_method not in methods:
                raise LmforgeError(f"start method {self.start_method!r} not available here: {methods}")
            return self.start_method
        if "fork" in methods and not self.safe_start and os.name == "posix" and sys.platform != "darwin":
            return "fork"
        return "forkserver" if "forkserver" in methods else "spawn"

    def open(self, context=None) -> LocalExecutor:
        self.context = context
        if self.workers > 1 and self.pool is None:
            ctx = mp.get_context(self._method())
            self.pool = ctx.Pool(self.workers, initializer=_set_context, initargs=(context,))
        return self

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        if self.pool is None:
            for item in items:
                yield fn(self.context, item)
            return
        pending: deque = deque()
        for item in items:
            pending.append(self.pool.apply_async(_call_with_context, (fn, item)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None

    def terminate(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def _ray_call(fn: Callable, context, item):
    return fn(context, item)


class RayExecutor:
    name = "ray"

    def __init__(self, workers: int = 0, address: str = ""):
        try:
            import ray
        except ImportError as e:
            raise LmforgeError("--engine ray needs Ray: pip install 'lmforge[ray]'") from e
        self.ray = ray
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            kwargs = {"address": address} if address else {"num_cpus": workers or available_cpus()}
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
        self.workers = workers or int(ray.cluster_resources().get("CPU", 1))
        self.remote = ray.remote(num_cpus=1)(_ray_call)
        self.context_ref = None

    def open(self, context=None) -> RayExecutor:
        self.context_ref = self.ray.put(context)  # stored once in the object store, shared by all tasks
        return self

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        pending: deque = deque()
        for item in items:
            pending.append(self.remote.remote(fn, self.context_ref, item))
            if len(pending) >= 2 * self.workers:
                yield self.ray.get(pending.popleft())
        while pending:
            yield self.ray.get(pending.popleft())

    def close(self) -> None:
        if self.owns_ray:
            self.ray.shutdown()

    terminate = close


def make_executor(engine: str = "local", workers: int = 0, address: str = "", start_method: str = "auto",
                  safe_start: bool = False):
    if engine == "local":
        return LocalExecutor(workers, start_method, safe_start)
    if engine == "ray":
        return RayExecutor(workers, address)
    raise LmforgeError(f"unknown engine {engine!r}: choose local or ray")
