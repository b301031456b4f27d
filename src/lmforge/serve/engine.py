"""The inference engine: requests in, streamed tokens out, one scheduled step at a time.

    engine = LLMEngine(model, tokenizer)
    engine.add_request("r1", tokenizer.encode("Hello"), SamplingParams(max_tokens=32))
    while engine.has_work:
        for out in engine.step(): print(out.text, end="")

`step()` = schedule (scheduler) -> forward over the packed batch (model runner, paged cache) ->
choose tokens (sampler) -> detokenize and check stop conditions -> free finished sequences.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.model.context import fit_to_context
from lmforge.serve.block_manager import BlockManager
from lmforge.serve.detokenizer import Detokenizer
from lmforge.serve.model_runner import ModelRunner
from lmforge.serve.paged_cache import PagedKVCache
from lmforge.serve.sampler import choose_tokens
from lmforge.serve.scheduler import Scheduler
from lmforge.serve.sequence import RequestOutput, SamplingParams, Sequence

log = logging.getLogger(__name__)

@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_mb: int = 512              # KV memory; sets the number of blocks unless num_blocks is given
    num_blocks: int | None = None
    max_num_seqs: int = 64              # sequences running at once
    max_batched_tokens: int = 512       # tokens per step (prefill chunks + decodes)
    max_model_len: int | None = None    # default: the model's max_seq_len, capped by the cache size
    prefix_caching: bool = True
    compile_decode: bool = False        # torch.compile the decode step (GPU)
    seed: int = 0                       # for requests without a seed of their own


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.config = cfg = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        param = next(model.parameters())
        self.device, dtype = param.device, model.embed_tokens.weight.dtype
        mcfg = model.cfg
        num_blocks = cfg.num_blocks or max(1, cfg.kv_cache_mb * 2**20 // PagedKVCache.bytes_per_block(mcfg, cfg.block_size, dtype))
        self.cache = PagedKVCache(mcfg, num_blocks, cfg.block_size, self.device, dtype)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_batched_tokens)
        self.runner = ModelRunner(model, self.cache, cfg.compile_decode)
        self.max_model_len = min(cfg.max_model_len or mcfg.max_seq_len, mcfg.max_seq_len, num_blocks * cfg.block_size)
        self.vocab_size = mcfg.vocab_size
        self.stop_ids = tokenizer.stop_ids() if tokenizer is not None else set()
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.seqs: dict[str, Sequence] = {}
        self.detoks: dict[str, Detokenizer] = {}
        self._ids = itertools.count()
        self.num_steps = 0

    # --- requests ---------------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise LmforgeError for a request that can never be served."""
        if not prompt_ids:
            raise LmforgeError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise LmforgeError(f"prompt token ids must be in [0, {self.vocab_size})")
        params.validate(self.vocab_size)
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise LmforgeError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request needs "
                f"{total} ({len(prompt_ids)} in the prompt + {params.max_tokens} max_tokens)")

    def add_request(self, request_id: str | None, prompt_ids: list[int], params: SamplingParams) -> str:
        self.check_request(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.seqs:
            raise LmforgeError(f"duplicate request id {request_id!r}")
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed % 2**63)
        seq = Sequence(request_id, prompt_ids, params, gen)
        self.seqs[request_id] = seq
        self.detoks[request_id] = Detokenizer(self.tokenizer, params.stop)
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its KV blocks; False if it is unknown or already done."""
        seq = self.seqs.pop(request_id, None)
        self.detoks.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # --- one step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        step, logits = self.runner.run(batch)
        for seq, n in batch:
            seq.num_computed += n
            self.blocks.register_full_blocks(seq)
        self.num_steps += 1
        if not step.sampled:
            return []
        tokens, logprobs, errors = choose_tokens(logits, step.sampled, self.generator)
        now = time.monotonic()
        outputs = []
        for seq, tok, lp, error in zip(step.sampled, tokens, logprobs, errors):
            if error is None:
                try:
                    outputs.append(self._append(seq, tok, lp, now))
                    continue
                except Exception as e:  # e.g. detokenizing: this request fails, the batch goes on
                    log.exception("request %s failed after sampling", seq.request_id)
                    error = e
            outputs.append(self._fail(seq, error))
        return outputs

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        """Finish one sequence with an error, freeing its blocks; the others are untouched."""
        self.scheduler.finish(seq)
        self.seqs.pop(seq.request_id, None)
        self.detoks.pop(seq.request_id, None)
        seq.finish_reason = "error"
        return RequestOutput(seq.request_id, [], "", [], True, "error", seq.num_prompt_tokens,
                             seq.num_output_tokens, seq.num_cached_prompt,
                             error=f"generation failed for this request ({type(error).__name__}: {error})")

    def _append(self, seq: Sequence, token: int, logprob, now: float) -> RequestOutput:
        seq.token_ids.append(token)
        seq.first_token_time = seq.first_token_time or now
        seq.last_token_time = now
        detok = self.detoks[seq.request_id]
        p = seq.params
        if (token in self.stop_ids and not p.ignore_eos) or token in p.stop_token_ids:
            seq.finish_reason = "stop"
        else:
            detok.push(token)
            if detok.stopped:
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
        finished = seq.finish_reason is not None
        if finished:
            self.scheduler.finish(seq)
            self.seqs.pop(seq.request_id, None)
            self.detoks.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, [token], detok.take(final=finished),
                             [logprob] if logprob is not None else [], finished, seq.finish_reason,
                             seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_prompt)

    # --- offline use ----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[dict]:
        """Run all prompts as one continuously batched workload; results in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(None, p, sp) for p, sp in zip(prompts, plist)]
        results = {i: {"text": "", "token_ids": [], "logprobs": [], "finish_reason": None, "error": None}
                   for i in ids}
        while self.has_work:
            for out in self.step():
                r = results[out.request_id]
                r["text"] += out.text
                r["token_ids"] += out.new_token_ids
                r["logprobs"] += out.logprobs
                r["finish_reason"] = out.finish_reason
                r["error"] = out.error
        return [results[i] for i in ids]


def complete(model, tokenizer, prompts: list[str], max_tokens: int, temperature: float = 0.0,
             seed: int | None = 0, chat: bool = False, config: EngineConfig | None = None) -> list[str]:
    """Complete every prompt through the engine as one batch and return the generated texts.

    chat=True wraps each prompt as a user message in the tokenizer's chat template."""
    engine = LLMEngine(model, tokenizer, config or EngineConfig(kv_cache_mb=128))
    # Prompts are text: special-token strings in them are not control tokens (the template's are).
    encoded = [tokenizer.encode_chat([{"role": "user", "content": p}]) if chat else tokenizer.encode_text(p)
               for p in prompts]
    fitted = [fit_to_context(ids or [tokenizer.eos_id or 0], max_tokens, engine.max_model_len) for ids in encoded]
    prompt_ids = [ids for ids, _ in fitted]
    params = [SamplingParams(max_tokens=n, temperature=temperature, seed=None if seed is None else seed + i)
              for i, (_, n) in enumerate(fitted)]
    return [r["text"] for r in engine.generate(prompt_ids, params)]
