"""Serving: the inference engine (paged KV cache, continuous batching, sampling, INT8), the
OpenAI-compatible HTTP server and the web chat page."""
from lmforge.serve.engine import EngineConfig, LLMEngine, complete
from lmforge.serve.sequence import RequestOutput, SamplingParams

__all__ = ["EngineConfig", "LLMEngine", "complete", "RequestOutput", "SamplingParams"]
