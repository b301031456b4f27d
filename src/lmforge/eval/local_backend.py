"""The in-process backend: an lmforge model (checkpoint, HF directory or GGUF) and its tokenizer."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.backend import BackendInfo, GenerationRequest, Progress
from lmforge.eval.loglikelihood import score_continuations
from lmforge.eval.stop_strings import truncate_at_stop
from lmforge.model.context import fit_to_context
from lmforge.model.scoring import score_tokens

def _files_fingerprint(ref: str) -> str:
    """Cheap identity of a model on disk (paths, sizes, mtimes): the result cache is keyed on it."""
    path = Path(ref)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


class LocalBackend:
    def __init__(self, model, tokenizer, name: str = "in-memory", batch_tokens: int | None = None,
                 generation_rows: int | None = None, fingerprint: str | None = None):
        self.model, self.tok = model, tokenizer
        params = next(model.parameters())
        on_gpu = params.device.type == "cuda"
        self.batch_tokens = batch_tokens or (32768 if on_gpu else 4096)
        self.generation_rows = generation_rows or (64 if on_gpu else 16)
        self.max_length = model.cfg.max_seq_len
        self._engine = None
        self._engine_lock = threading.Lock()  # one engine, one caller at a time
        self.prefix_id = next((i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None), None)
        if fingerprint is None:  # an in-memory model: identify it by its weights
            h = hashlib.sha256()
            for p in model.parameters():
                h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
            fingerprint = h.hexdigest()[:16]
        self.info = BackendInfo("local", name, {
            "fingerprint": fingerprint, "device": str(params.device), "dtype": str(params.dtype).replace("torch.", ""),
            "parameters": model.num_params(), "max_seq_len": self.max_length, "vocab_size": model.cfg.vocab_size})

    @classmethod
    def from_ref(cls, ref: str, tokenizer: str | None = None, dtype: str | None = "auto", device: str | None = "auto",
                 batch_tokens: int | None = None) -> LocalBackend:
        from lmforge.model import load_pretrained

        loaded = load_pretrained(ref, tokenizer=tokenizer, dtype=dtype or "auto", device=device or "auto")
        params = next(loaded.model.parameters())
        return cls(loaded.model, loaded.tokenizer, name=str(ref), batch_tokens=batch_tokens,
                   fingerprint=f"{_files_fingerprint(ref)}:{str(params.dtype).replace('torch.', '')}")

    # --- log-likelihood ----------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation as the model would see `context + continuation`.
        Trailing context whitespace moves to the continuation (" Paris" is one token, not two)."""
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped):] + continuation
        ctx = self.tok.encode(context) if context else []
        whole = self.tok.encode(context + continuation)
        cont = whole[len(ctx):] if whole[: len(ctx)] == ctx else self.tok.encode(continuation)
        if not ctx:
            if self.prefix_id is None:
                raise LmforgeError("an empty context needs a BOS or EOS token to condition on")
            ctx = [self.prefix_id]
        return ctx, cont

    def loglikelihood(self, requests: list[tuple[str, str]], progress: Progress = None) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(c, x) for c, x in requests]
        empty = [i for i, (_, cont) in enumerate(pairs) if not cont]
        if empty:
            raise LmforgeError(f"{len(empty)} continuation(s) encode to no tokens (e.g. {requests[empty[0]][1]!r})")
        return score_continuations(self.model, pairs, self.batch_tokens, progress=progress)

    def loglikelihood_rolling(self, texts: list[str], progress: Progress = None) -> list[tuple[float, int]]:
        """(log-likelihood in nats, tokens scored) of each text from its start (after a BOS/EOS
        prefix), in disjoint windows of max_seq_len tokens: the one scorer, as train and int8-report."""
        if self.prefix_id is None:
            raise LmforgeError("rolling log-likelihood needs a BOS or EOS token to start from")
        results = []
        for text in texts:
            ids = [self.prefix_id] + self.tok.encode(text)
            if len(ids) < 2:  # nothing to predict
                results.append((0.0, 0))
                continue
            score = score_tokens(self.model, ids, window=self.max_length,
                                 batch_size=max(1, self.batch_tokens // self.max_length))
            results.append((-score.nll, score.tokens))
        if progress:
            progress(len(texts))
        return results

    # --- generation --------------------------------------------------------------------------
    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        text = request.prompt
        if request.chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return self.tok.encode(text)

    def engine(self):
        """The serving engine (paged KV cache, continuous batching) over this model, made once."""
        if self._engine is None:
            from lmforge.serve import EngineConfig, LLMEngine

            on_gpu = next(self.model.parameters()).device.type == "cuda"
            self._engine = LLMEngine(self.model, self.tok, EngineConfig(
                kv_cache_mb=8192 if on_gpu else 1024, max_num_seqs=self.generation_rows,
                max_batched_tokens=4096 if on_gpu else 512))
        return self._engine

    def generate(self, requests: list[GenerationRequest], progress: Progress = None) -> list[str]:
        """All requests as one continuously batched workload through the serving engine."""
        from lmforge.serve import SamplingParams

        engine = self.engine()
        limit = engine.max_model_len
        prompts, params = [], []
        for r in requests:
            ids, max_tokens = fit_to_context(self.prompt_ids(r) or [self.prefix_id or 0], r.max_new_tokens, limit)
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=max_tokens, temperature=r.temperature, top_p=r.top_p,
                                         top_k=r.top_k, seed=r.seed, stop=[s for s in r.stop if s]))
        texts = []
        step = 4 * self.generation_rows  # a few engine batches per progress update
        for start in range(0, len(prompts), step):
            with self._engine_lock:
                outs = engine.generate(prompts[start: start + step], params[start: start + step])
            texts += [truncate_at_stop(o["text"], r.stop) for o, r in zip(outs, requests[start: start + step])]
            if progress:
                progress(len(outs))
        return texts
