"""The inference engine: requests in, streamed tokens out, one scheduled step at a time.

    engine = LLMEngine(model, tokenizer)
    engine.add_request("r1", tokenizer.encode("Hello"), SamplingParams(max_tokens=32))
    while engine.has_work:
        for out in engine.step(): print(out.text, end="")

`step()` = [propose speculative drafts] -> schedule (scheduler) -> forward over the packed batch (model runner, paged cache) ->
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
from lmforge.model.packed_linear import MIN_PACKED_ROWS, pack_linears
from lmforge.serve.block_manager import BlockManager
from lmforge.serve.detokenizer import Detokenizer
from lmforge.serve.model_runner import ModelRunner
from lmforge.serve.paged_cache import PagedKVCache
from lmforge.serve.sampler import choose_tokens, take_rows
from lmforge.serve.scheduler import Scheduler
from lmforge.serve.sequence import RequestOutput, SamplingParams, Sequence
from lmforge.serve.speculative import DraftBudget, SpeculativeConfig, SpecState, make_proposer
from lmforge.serve.speculative.verify import sampling_probs, verify_greedy, verify_sampled

log = logging.getLogger(__name__)
WARM_UP_STREAMS = max(2, MIN_PACKED_ROWS)   # decoding together: the several-rows graph, the packed weights

@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_mb: int = 512              # KV memory; sets the number of blocks unless num_blocks is given
    num_blocks: int | None = None
    max_num_seqs: int = 64              # sequences running at once
    max_batched_tokens: int = 512       # tokens per step (prefill chunks + decodes)
    max_model_len: int | None = None    # default: the model's max_seq_len, capped by the cache size
    prefix_caching: bool = True
    compile_decode: bool = False        # torch.compile decode steps (model_runner.py)
    seed: int = 0                       # for requests without a seed of their own
    speculative: SpeculativeConfig | None = None   # speculative decoding (serve/speculative)
    kv_dtype: str = "auto"              # "auto" (the model's dtype) or "int8" (per-head scales, ~2x the tokens)
    prepack_weights: bool = True        # float32 on CPU: linears through oneDNN on packed copies (model/packed_linear.py)

    def __post_init__(self):   # a zero here would leave the scheduler nothing to run: a silent hang
        sizes = {"block_size": self.block_size, "kv_cache_mb": self.kv_cache_mb, "max_num_seqs": self.max_num_seqs,
                 "max_batched_tokens": self.max_batched_tokens,
                 "num_blocks": 1 if self.num_blocks is None else self.num_blocks}
        for name, value in sizes.items():
            if value < 1:
                raise LmforgeError(f"EngineConfig.{name} must be at least 1, got {value}")


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.config = cfg = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        param = next(model.parameters())
        self.device, dtype = param.device, model.embed_tokens.weight.dtype
        mcfg = model.cfg
        if cfg.prepack_weights and self.device.type == "cpu" and dtype == torch.float32:
            pack_linears(model)   # 16-stream decode 1.19x faster; one more copy of those weights in memory
        block_bytes = PagedKVCache.bytes_per_block(mcfg, cfg.block_size, dtype, cfg.kv_dtype)
        num_blocks = cfg.num_blocks or max(1, cfg.kv_cache_mb * 2**20 // block_bytes)
        self.cache = PagedKVCache(mcfg, num_blocks, cfg.block_size, self.device, dtype, cfg.kv_dtype)
        self._fresh_allocator(num_blocks)
        self.max_model_len = min(cfg.max_model_len or mcfg.max_seq_len, mcfg.max_seq_len, num_blocks * cfg.block_size)
        self.vocab_size = mcfg.vocab_size
        self.stop_ids = tokenizer.stop_ids() if tokenizer is not None else set()
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.seqs: dict[str, Sequence] = {}
        self.detoks: dict[str, Detokenizer] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.proposer, medusa = None, None   # medusa: heads whose guesses the runner's every step gives
        if cfg.speculative is not None:
            cfg.speculative.validate(self.vocab_size)
            if cfg.speculative.method == "medusa":
                heads = cfg.speculative.medusa_heads
                if heads.dim != mcfg.dim:
                    raise LmforgeError(f"the medusa heads were trained for hidden size {heads.dim}, not {mcfg.dim}")
                medusa = heads.first(cfg.speculative.num_tokens)
            self.proposer = make_proposer(cfg.speculative, num_blocks, cfg.block_size, self.device)
        self.runner = ModelRunner(model, self.cache, cfg.compile_decode, medusa)
        self.spec_stats = {"rounds": 0, "drafted": 0, "accepted": 0}

    def _fresh_allocator(self, num_blocks: int) -> None:
        cfg = self.config
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_batched_tokens)

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

    def add_request(self, request_id: str | None, prompt_ids: list[int], params: SamplingParams,
                    speculative: bool | None = None) -> str:
        """speculative: whether this request uses the engine's speculative decoding (None: the
        engine's default). Requests with penalties, logit bias or logprobs never speculate."""
        self.check_request(prompt_ids, params)
        if speculative and self.proposer is None:
            raise LmforgeError("this engine was started without speculative decoding")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.seqs:
            raise LmforgeError(f"duplicate request id {request_id!r}")
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed % 2**63)
        seq = Sequence(request_id, prompt_ids, params, gen)
        if self.proposer is not None and can_speculate(params) and \
                (speculative if speculative is not None else self.config.speculative.default_on):
            sc = self.config.speculative
            seq.spec = SpecState(budget=DraftBudget(sc.num_tokens) if sc.adaptive else None)
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
        if self.proposer is not None:
            self._plan_drafts()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        if self.proposer is not None:
            batch = self._fill_drafts(batch)
        step, logits, guesses = self.runner.run(batch)
        for seq, n in batch:
            if seq.spec is None or not seq.spec.draft:  # speculating ones advance after verification
                seq.num_computed += n
                self.blocks.register_full_blocks(seq)
        self.num_steps += 1
        if not step.sampled:
            return []
        starts = [0]
        for n in step.num_logits:
            starts.append(starts[-1] + n)
        plain = [i for i, n in enumerate(step.num_logits) if n == 1]
        chosen = {}
        if plain:
            rows = take_rows(logits, [starts[i] for i in plain])
            for i, *picked in zip(plain, *choose_tokens(rows, [step.sampled[i] for i in plain], self.generator)):
                chosen[i] = picked
        now = time.monotonic()
        outputs, observed = [], []
        for i, seq in enumerate(step.sampled):
            if i in chosen:
                tok, lp, error = chosen[i]
                tokens, lps = [tok], [lp] if lp is not None else []
            else:
                tokens, lps, error = self._verify(seq, logits[starts[i]:starts[i + 1]]), [], None
                if isinstance(tokens, Exception):
                    tokens, error = None, tokens
            if error is None:
                try:
                    outputs.append(self._append(seq, tokens, lps, now))
                    if guesses is not None and seq.spec is not None and seq.finish_reason is None:
                        observed.append((seq, starts[i] + len(tokens) - 1))  # the row behind the newest token
                    continue
                except Exception as e:  # e.g. detokenizing: this request fails, the batch goes on
                    log.exception("request %s failed after sampling", seq.request_id)
                    error = e
            outputs.append(self._fail(seq, error))
        if observed:
            self.proposer.observe([s for s, _ in observed], guesses[[r for _, r in observed]].tolist())
        return outputs

    # --- speculative decoding ---------------------------------------------------------------
    def _plan_drafts(self) -> None:
        """Before scheduling: how many draft tokens each decoding, speculating sequence wants."""
        k = self.config.speculative.num_tokens
        for seq in self.scheduler.running:
            if seq.spec is None:
                continue
            seq.spec.reset()
            if seq.num_pending != 1:
                continue
            # Never draft past max_tokens or the context: a step emits at most draft + 1 tokens.
            room = min(k, seq.params.max_tokens - seq.num_output_tokens - 1, self.max_model_len - seq.num_tokens - 1)
            if room > 0 and seq.spec.budget is not None:
                room = min(room, seq.spec.budget.allowed())
            if room > 0:
                seq.spec.want = self.proposer.plan(seq, room)

    def _fill_drafts(self, batch: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """After scheduling: draft as many tokens as the scheduler made room for."""
        work = []
        for seq, n in batch:
            if seq.spec is not None and seq.spec.want:
                k = n - seq.num_pending
                if k > 0:
                    work.append((seq, k))
                else:
                    seq.spec.reset()
        if work:
            self.proposer.propose(work, self.generator)
            for seq, k in work:
                spec = seq.spec
                spec.draft = spec.draft[:k]
                if spec.draft_probs is not None:
                    spec.draft_probs = spec.draft_probs[:k]
        return [(seq, seq.num_pending + len(seq.spec.draft) if seq.spec is not None and seq.spec.draft else n)
                for seq, n in batch]

    def _verify(self, seq: Sequence, rows: torch.Tensor) -> list[int] | Exception:
        """rows [1 + k, V]: the target's logits at the last real token and each draft token ->
        the tokens to emit; the accepted positions become computed, the rest are rolled back."""
        spec = seq.spec
        draft = spec.draft
        try:
            if torch.isnan(rows).any():
                raise FloatingPointError("the model produced NaN logits for this request")
            probs = sampling_probs(rows, seq.params)
            if probs is None:
                tokens = verify_greedy(rows, draft)
            else:
                tokens = verify_sampled(probs, draft, spec.draft_probs, seq.generator or self.generator)
        except Exception as e:
            log.exception("speculative verification failed for request %s", seq.request_id)
            return e
        accepted = len(tokens) - 1
        # K/V are valid for the last real token and the accepted draft tokens; those of rejected
        # draft tokens lie beyond num_computed and are overwritten by the next step.
        seq.num_computed += 1 + accepted
        if spec.budget is not None:
            spec.budget.update(len(draft), accepted)
        self.spec_stats["rounds"] += 1
        self.spec_stats["drafted"] += len(draft)
        self.spec_stats["accepted"] += accepted
        spec.reset()
        return tokens

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        """Finish one sequence with an error, freeing its blocks; the others are untouched."""
        self.scheduler.finish(seq)
        self.seqs.pop(seq.request_id, None)
        self.detoks.pop(seq.request_id, None)
        seq.finish_reason = "error"
        return RequestOutput(seq.request_id, [], "", [], True, "error", seq.num_prompt_tokens,
                             seq.num_output_tokens, seq.num_cached_prompt,
                             error=f"generation failed for this request ({type(error).__name__}: {error})")

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list, now: float) -> RequestOutput:
        """Append one step's tokens (several when speculating), stopping at the first that ends it."""
        seq.first_token_time = seq.first_token_time or now
        seq.last_token_time = now
        detok = self.detoks[seq.request_id]
        p = seq.params
        new = []
        for token in tokens:
            seq.token_ids.append(token)
            new.append(token)
            if (token in self.stop_ids and not p.ignore_eos) or token in p.stop_token_ids:
                seq.finish_reason = "stop"
            else:
                detok.push(token)
                if detok.stopped:
                    seq.finish_reason = "stop"
                elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                    seq.finish_reason = "length"
            if seq.finish_reason is not None:
                break
        finished = seq.finish_reason is not None
        if finished:
            self.scheduler.finish(seq)
            self.seqs.pop(seq.request_id, None)
            self.detoks.pop(seq.request_id, None)
        elif seq.spec is not None:
            self.blocks.trim(seq)                   # KV rollback of rejected draft tokens
            self.blocks.register_full_blocks(seq)   # accepted draft tokens may have filled blocks
        return RequestOutput(seq.request_id, new, detok.take(final=finished), logprobs[:len(new)], finished,
                             seq.finish_reason, seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_prompt)

    # --- offline use ----------------------------------------------------------------------------
    def warm_up(self) -> float:
        """Meet the shapes serving will meet before the first request does: one stream decoding alone,
        WARM_UP_STREAMS together, and a short prompt alone (several rows, one logits row; with
        compile_decode, the three graphs compiled; on float32 CPU, the packed weights built), so that a
        server answers its first requests at full speed. Leaves no
        trace: the prefix cache, step counters and request ids start afresh, and greedy decoding
        draws nothing from the seed generator. -> seconds taken."""
        start = time.monotonic()
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        self.generate([[0] * 4], params)
        self.generate([[i] * 4 for i in range(WARM_UP_STREAMS)], params)
        if self.runner.compile_decode:   # its prompt step: the first one ran before anything was compiled
            self.generate([[0] * 4], params)
        self._fresh_allocator(self.blocks.num_blocks)
        self.num_steps, self._ids = 0, itertools.count()
        self.spec_stats = dict.fromkeys(self.spec_stats, 0)
        return time.monotonic() - start

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


def can_speculate(params: SamplingParams) -> bool:
    """Penalties depend on every earlier output token, logprobs are reported per sampled token and a
    grammar masks each step by the state the previous token left: such requests decode one token per
    step (correct, only not sped up)."""
    return not (params.presence_penalty or params.frequency_penalty or params.logit_bias
                or params.logprobs is not None or params.grammar is not None)
