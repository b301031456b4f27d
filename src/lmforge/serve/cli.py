"""`lmforge generate`, `lmforge serve` (OpenAI-compatible HTTP server + web chat), `lmforge chat`
(terminal chat), `lmforge int8-report` and `lmforge medusa-train` (speculative heads for serve):
every command that runs a model through the engine."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import typer

from lmforge.errors import LmforgeError
from lmforge.model.cli_options import (device_option, dtype_option, model_alias, model_argument, pick_model,
                                       tokenizer_option)


def _engine_config(kv_cache_mb, max_num_seqs, max_batched_tokens, block_size, max_model_len, prefix_caching,
                   compile_decode, kv_dtype="auto", speculative="off", num_speculative=4, medusa=None,
                   prepack=True):
    from lmforge.serve.engine import EngineConfig
    from lmforge.serve.speculative import SpeculativeConfig
    from lmforge.serve.paged_cache import KV_DTYPES
    if kv_dtype not in KV_DTYPES:
        raise LmforgeError(f"--kv-dtype must be one of {', '.join(KV_DTYPES)} (got {kv_dtype!r})")
    if speculative not in ("off", "ngram", "medusa"):
        raise LmforgeError(f"--speculative must be off, ngram or medusa (got {speculative!r})")
    if (speculative == "medusa") != bool(medusa):
        raise LmforgeError("--speculative medusa and --medusa HEADS go together (heads from `lmforge medusa-train`)")
    spec = None if speculative == "off" else SpeculativeConfig(speculative, num_speculative)
    return EngineConfig(block_size=block_size, kv_cache_mb=kv_cache_mb, max_num_seqs=max_num_seqs,
                        max_batched_tokens=max_batched_tokens, max_model_len=max_model_len or None,
                        prefix_caching=prefix_caching, compile_decode=compile_decode, kv_dtype=kv_dtype,
                        speculative=spec, prepack_weights=prepack)


def serve_command(
    model: str = model_argument(),
    tokenizer: str = tokenizer_option(),
    host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(8000, min=0, max=65535),
    api_key: str = typer.Option(None, envvar="LMFORGE_API_KEY", help="require 'Authorization: Bearer KEY' on /v1"),
    name: str = typer.Option(None, help="model name clients use (default: the file or directory name)"),
    dtype: str = dtype_option(),
    device: str = device_option(),
    int8: bool = typer.Option(False, "--int8", help="INT8 weight-only quantisation (per channel)"),
    gguf_int4: bool = typer.Option(False, "--gguf-int4", help="keep a GGUF's Q4_0/Q4_1 matrices as int4 layers, "
                                   "as stored (no dequantising); with --int8 the rest (the LM head) goes int8"),
    kv_cache_mb: int = typer.Option(512, min=1, help="memory for the paged KV cache"),
    block_size: int = typer.Option(16, min=1, help="tokens per KV block"),
    max_num_seqs: int = typer.Option(64, min=1, help="requests decoded at once"),
    max_batched_tokens: int = typer.Option(512, min=1, help="token budget of one engine step"),
    max_model_len: int = typer.Option(0, min=0, help="context limit (0: the model's)"),
    max_queue: int = typer.Option(256, min=1, help="waiting requests before answering 429"),
    default_max_tokens: int = typer.Option(512, min=1, help="chat max_tokens when the client gives none"),
    prefix_caching: bool = typer.Option(True, help="share KV blocks of identical prompt prefixes"),
    compile_decode: bool = typer.Option(False, "--compile", help="torch.compile decode steps (CPU or GPU): "
                                        "~1.6x faster int4 decode on CPU after a minute or two of compiling"),
    threads: int = typer.Option(0, min=0, max=4096, help="CPU threads for PyTorch (0: its default)"),
    prepack: bool = typer.Option(True, help="float32 on CPU: linears multiply through oneDNN on packed "
                                 "copies of their weights, q/k/v and gate/up stacked (faster batched steps; "
                                 "those weights held twice)"),
    guard: bool = typer.Option(False, "--guard", help="screen requests for prompt injection; redact PII and "
                               "system-prompt leaks in replies (blocked requests get a 400, code guard_blocked)"),
    guard_classifier: str = typer.Option("trained", help="guard scorer: trained (fit on the generated sets at "
                                         "start), rules, or a saved guard / HF classifier directory"),
    guard_input: str = typer.Option("block", help="guard policy for attacks: block, redact or flag"),
    guard_output: str = typer.Option("redact", help="guard policy for PII and leaks in replies: block, redact or flag"),
    kv_dtype: str = typer.Option("auto", help="KV cache storage: auto (the model's dtype) or int8 (~2x the tokens)"),
    speculative: str = typer.Option("off", help="speculative decoding: off, ngram (prompt lookup) or medusa"),
    num_speculative: int = typer.Option(4, min=1, max=16, help="draft tokens per step with --speculative"),
    medusa: Path = typer.Option(None, help="medusa heads for --speculative medusa (from `lmforge medusa-train`)"),
    model_opt: str = model_alias(),
):
    """Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions) with a web chat at /."""
    from lmforge.serve.server import listen_socket, run_on_socket
    guard_config = _guard_config(guard_input, guard_output) if guard else None  # bad settings fail first
    sock = listen_socket(host, port)  # a busy port fails now, before loading the model
    import torch

    from lmforge.serve.async_engine import AsyncEngine
    from lmforge.serve.engine import LLMEngine
    from lmforge.serve.server import create_app

    if threads:
        torch.set_num_threads(threads)
    config = _engine_config(kv_cache_mb, max_num_seqs, max_batched_tokens, block_size, max_model_len,
                            prefix_caching, compile_decode, kv_dtype, speculative, num_speculative, medusa,
                            prepack)
    net, tok, default_name = _load(pick_model(model, model_opt), tokenizer, dtype, device, int8, gguf_int4)
    _say_int4_kernel(net)
    if medusa:
        from lmforge.serve.speculative.medusa import load_heads
        config.speculative.medusa_heads = load_heads(medusa, net)
    screen = _guard(guard_classifier, guard_config) if guard else None
    llm = LLMEngine(net, tok, config)
    if compile_decode:
        typer.echo("compiling the decode graphs (a minute or more; cached on disk for later starts)")
    typer.echo(f"warmed up in {llm.warm_up():.1f} s")
    engine = AsyncEngine(llm, max_queue=max_queue)
    app = create_app(engine, tok, name or default_name, api_key, default_max_tokens, guard=screen)
    typer.echo(f"serving {name or default_name} on http://{host}:{sock.getsockname()[1]}  (chat page at /, API at /v1)")
    try:
        run_on_socket(app, sock)
    finally:
        engine.shutdown()
        sock.close()


def _say_int4_kernel(net) -> None:
    """Name the kernel CPU int4 layers will use (and build lmforge's now, not on the first request)."""
    from lmforge.model import int4_cpu
    from lmforge.model.quantized import Int4Linear
    if any(isinstance(m, Int4Linear) and m.codebook is None and m.packed.device.type == "cpu" for m in net.modules()):
        typer.echo(f"int4 layers on CPU: {int4_cpu.describe()} (LMFORGE_INT4_KERNEL=auto|avx2|torch)")


def _guard_config(input_policy: str, output_policy: str):
    from lmforge.safety.guard import GuardConfig
    return GuardConfig(input_policy=input_policy, output_policy=output_policy)


def _guard(classifier: str, config):
    """The guard (`trained`: its classifier is fit on the generated sets now, ~10 s on CPU)."""
    from lmforge.safety.guard import Guard
    from lmforge.safety.load import load_classifier
    return Guard(load_classifier(classifier), config)


def chat_command(
    model: str = model_argument(),
    tokenizer: str = tokenizer_option(),
    system: str = typer.Option(None, help="system prompt"),
    temperature: float = typer.Option(0.7, min=0.0, max=2.0),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0),
    max_tokens: int = typer.Option(512, min=1),
    seed: int = typer.Option(None),
    dtype: str = dtype_option(),
    device: str = device_option(),
    int8: bool = typer.Option(False, "--int8", help="INT8 weight-only quantisation (per channel)"),
    model_opt: str = model_alias(),
):
    """Chat in the terminal, through the same engine the server uses. /reset clears, /exit quits."""
    from lmforge.serve.engine import EngineConfig, LLMEngine
    from lmforge.serve.sequence import SamplingParams

    net, tok, _ = _load(pick_model(model, model_opt), tokenizer, dtype, device, int8)
    engine = LLMEngine(net, tok, EngineConfig(kv_cache_mb=256, max_num_seqs=1))
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids = tok.encode_chat(messages)  # typed special-token strings stay text
        room = engine.max_model_len - len(ids)
        if room < 1:
            history.clear()
            typer.echo("[the conversation no longer fits the context; cleared]")
            continue
        params = SamplingParams(max_tokens=min(max_tokens, room), temperature=temperature, top_p=top_p, seed=seed)
        engine.add_request(None, ids, params)
        reply = []
        sys.stdout.write("bot> " if interactive else "")
        try:
            while engine.has_work:
                for out in engine.step():
                    sys.stdout.write(out.text)
                    sys.stdout.flush()
                    reply.append(out.text)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            for request_id in list(engine.seqs):
                engine.abort(request_id)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def int8_report_command(
    model: str = model_argument(),
    tokenizer: str = tokenizer_option(),
    text_file: Path = typer.Option(None, help="held-out UTF-8 text (default: the stdlib validation split)"),
    max_chars: int = typer.Option(30_000, min=100),
    kv: bool = typer.Option(False, "--kv", help="the int8 KV cache instead of int8 weights (+ greedy agreement)"),
    dtype: str = dtype_option(),
    device: str = device_option(),
    model_opt: str = model_alias(),
):
    """Perplexity before and after INT8 weight-only (or, with --kv, KV-cache) quantisation, on held-out text."""
    import json

    from lmforge.serve.perplexity import heldout_text, int8_report

    text = _read_text(text_file)[:max_chars] if text_file else heldout_text(max_chars)
    net, tok, _ = _load(pick_model(model, model_opt), tokenizer, dtype, device, False)
    if len(tok.encode(text)) < 2:
        raise LmforgeError("the held-out text must encode to at least 2 tokens")
    if kv:
        from lmforge.serve.kv_report import kv_int8_report
        prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in KV_AGREEMENT_QUESTIONS]
        typer.echo(json.dumps(kv_int8_report(net, tok, text, prompts), indent=2))
        return
    typer.echo(json.dumps(int8_report(net, tok, text), indent=2))


KV_AGREEMENT_QUESTIONS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain what a CPU does.",
                          "Give me three tips for learning to code.", "Why is the sky blue?",
                          "Describe a cat in two sentences.", "How do airplanes stay in the air?",
                          "Write a poem about the ocean."]


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise LmforgeError(f"no such file: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise LmforgeError(f"cannot read {path}: {e.strerror}") from None


def generate_command(
    model: str = model_argument(),
    prompt: str = typer.Option(..., "--prompt", "-p"),
    tokenizer: str = tokenizer_option(),
    max_tokens: int = typer.Option(128, min=1, help="new tokens at most (clamped to the context)"),
    temperature: float = typer.Option(0.8, min=0.0, max=100.0, help="0: greedy"),
    top_k: int = typer.Option(0, min=0, help="0: off"),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(None, min=0, help="same seed, same text (default: random)"),
    chat: bool = typer.Option(False, help="wrap the prompt in the tokenizer's chat template"),
    dtype: str = dtype_option(),
    device: str = device_option(),
    model_opt: str = model_alias(),
):
    """Sample a continuation through the serving engine, streaming text to stdout."""
    from lmforge.model.context import fit_to_context
    from lmforge.serve.engine import EngineConfig, LLMEngine
    from lmforge.serve.sequence import SamplingParams

    net, tok, _ = _load(pick_model(model, model_opt), tokenizer, dtype, device, False)
    ids = tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode_text(prompt)
    ids, max_tokens = fit_to_context(ids, max_tokens, net.cfg.max_seq_len)
    block = 16  # a cache just big enough for this one sequence
    engine = LLMEngine(net, tok, EngineConfig(block_size=block, num_blocks=-(-(len(ids) + max_tokens) // block),
                                              max_num_seqs=1, seed=random.SystemRandom().randrange(2**31)))
    engine.add_request(None, ids, SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                                 top_p=top_p, seed=seed))
    sys.stdout.write("" if chat else prompt)
    while engine.has_work:
        for out in engine.step():
            sys.stdout.write(out.text)
            sys.stdout.flush()
    sys.stdout.write("\n")


def medusa_train_command(
    model: str = model_argument(),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the heads (medusa.safetensors + medusa.json)"),
    tokenizer: str = tokenizer_option(),
    prompts: Path = typer.Option(None, help="UTF-8 file, one prompt per line (default: built-in instructions)"),
    num_prompts: int = typer.Option(64, min=2, max=100_000, help="prompts used (the first N)"),
    heads: int = typer.Option(4, min=1, max=16, help="medusa heads: tokens guessed past the next one"),
    steps: int = typer.Option(300, min=1, max=1_000_000, help="optimiser steps"),
    lr: float = typer.Option(1e-3, min=1e-7, max=0.5),
    batch_size: int = typer.Option(64, min=1, max=65536, help="positions per step"),
    max_tokens: int = typer.Option(128, min=1, max=100_000, help="greedy tokens the model writes per prompt"),
    chat: bool = typer.Option(True, help="wrap each prompt in the tokenizer's chat template"),
    seed: int = typer.Option(0, min=0, max=2**31 - 1),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into a non-empty folder that is not heads"),
    dtype: str = dtype_option(),
    device: str = device_option(),
    model_opt: str = model_alias(),
):
    """Train Medusa heads for speculative decoding on the model's own greedy outputs (self-distillation)."""
    import json

    from lmforge.outputs import check_destination
    from lmforge.serve.speculative.medusa import save_heads
    from lmforge.serve.speculative.medusa_train import MedusaTrainConfig, default_prompts, train_medusa

    config = MedusaTrainConfig(heads, steps, lr, batch_size, max_tokens, seed)
    config.validate()
    check_destination(out, "medusa-heads", overwrite)  # a bad destination fails before the work
    texts = [line for line in _read_text(prompts).splitlines() if line.strip()] if prompts else \
        default_prompts(num_prompts, seed)
    texts = texts[:num_prompts]
    if len(texts) < 2:
        raise LmforgeError("medusa training needs at least 2 prompts (one is held out)")
    name = pick_model(model, model_opt)
    net, tok, model_name = _load(name, tokenizer, dtype, device, False)
    ids = [tok.encode_chat([{"role": "user", "content": t}]) if chat else tok.encode_text(t) for t in texts]
    trained, report = train_medusa(net, tok, [i or [tok.eos_id or 0] for i in ids], config,
                                   progress=lambda message: typer.echo(message, err=True))
    save_heads(trained, out, {"model": model_name, "report": report}, overwrite)
    typer.echo(json.dumps(report, indent=2))
    typer.echo(f"wrote {out}")


def _load(model: str | None, tokenizer: str | None, dtype: str, device: str, int8: bool, gguf_int4: bool = False):
    """-> (model, tokenizer, served name), INT8-quantised on request (the layers still in float)."""
    from lmforge.model import load_pretrained
    from lmforge.quant.int8 import quantize_int8

    loaded = load_pretrained(model, tokenizer, dtype, device, gguf_int4=gguf_int4)
    if int8:
        quantize_int8(loaded.model)
    return loaded.model, loaded.tokenizer, loaded.name


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
    app.command("serve")(serve_command)
    app.command("chat")(chat_command)
    app.command("int8-report")(int8_report_command)
    app.command("medusa-train")(medusa_train_command)
