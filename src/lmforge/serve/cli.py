"""`lmforge serve` (OpenAI-compatible HTTP server + web chat) and `lmforge chat` (terminal chat)."""
from __future__ import annotations

import os
import sys

import typer

from lmforge.errors import LmforgeError

MODEL_HELP = "GGUF file, lmforge checkpoint or HF directory (default: the bundled SmolLM2-135M-Instruct GGUF)"


def _engine_config(kv_cache_mb, max_num_seqs, max_batched_tokens, block_size, max_model_len, prefix_caching,
                   compile_decode):
    from lmforge.serve.engine import EngineConfig
    return EngineConfig(block_size=block_size, kv_cache_mb=kv_cache_mb, max_num_seqs=max_num_seqs,
                        max_batched_tokens=max_batched_tokens, max_model_len=max_model_len or None,
                        prefix_caching=prefix_caching, compile_decode=compile_decode)


def serve_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    tokenizer: str = typer.Option(None, help="tokenizer file/dir (default: the model's)"),
    host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(8000, min=0, max=65535),
    api_key: str = typer.Option(None, envvar="LMFORGE_API_KEY", help="require 'Authorization: Bearer KEY' on /v1"),
    name: str = typer.Option(None, help="model name clients use (default: the file or directory name)"),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16, float16"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    int8: bool = typer.Option(False, "--int8", help="INT8 weight-only quantisation (per channel)"),
    kv_cache_mb: int = typer.Option(512, min=1, help="memory for the paged KV cache"),
    block_size: int = typer.Option(16, min=1, help="tokens per KV block"),
    max_num_seqs: int = typer.Option(64, min=1, help="requests decoded at once"),
    max_batched_tokens: int = typer.Option(512, min=1, help="token budget of one engine step"),
    max_model_len: int = typer.Option(0, min=0, help="context limit (0: the model's)"),
    max_queue: int = typer.Option(256, min=1, help="waiting requests before answering 429"),
    default_max_tokens: int = typer.Option(512, min=1, help="chat max_tokens when the client gives none"),
    prefix_caching: bool = typer.Option(True, help="share KV blocks of identical prompt prefixes"),
    compile_decode: bool = typer.Option(False, "--compile", help="torch.compile the decode step (GPU)"),
    threads: int = typer.Option(0, min=0, help="CPU threads for PyTorch (0: its default)"),
):
    """Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions) with a web chat at /."""
    from lmforge.serve.server import listen_socket, run_on_socket
    sock = listen_socket(host, port)  # a busy port fails now, before loading the model
    import torch

    from lmforge.serve.async_engine import AsyncEngine
    from lmforge.serve.engine import LLMEngine
    from lmforge.serve.loading import load_for_serving
    from lmforge.serve.server import create_app

    if threads:
        torch.set_num_threads(threads)
    net, tok, default_name = load_for_serving(model, tokenizer, dtype, device, int8)
    config = _engine_config(kv_cache_mb, max_num_seqs, max_batched_tokens, block_size, max_model_len,
                            prefix_caching, compile_decode)
    engine = AsyncEngine(LLMEngine(net, tok, config), max_queue=max_queue)
    app = create_app(engine, tok, name or default_name, api_key, default_max_tokens)
    typer.echo(f"serving {name or default_name} on http://{host}:{sock.getsockname()[1]}  (chat page at /, API at /v1)")
    try:
        run_on_socket(app, sock)
    finally:
        engine.shutdown()
        sock.close()


def chat_command(
    model: str = typer.Argument(None, help=MODEL_HELP),
    tokenizer: str = typer.Option(None, help="tokenizer file/dir (default: the model's)"),
    system: str = typer.Option(None, help="system prompt"),
    temperature: float = typer.Option(0.7, min=0.0, max=2.0),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0),
    max_tokens: int = typer.Option(512, min=1),
    seed: int = typer.Option(None),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
    int8: bool = typer.Option(False, "--int8"),
):
    """Chat in the terminal, through the same engine the server uses. /reset clears, /exit quits."""
    from lmforge.serve.engine import EngineConfig, LLMEngine
    from lmforge.serve.loading import load_for_serving
    from lmforge.serve.sequence import SamplingParams

    net, tok, _ = load_for_serving(model, tokenizer, dtype, device, int8)
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
        ids = tok.encode(tok.apply_chat_template(messages))
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
    model: str = typer.Argument(None, help=MODEL_HELP),
    tokenizer: str = typer.Option(None),
    text_file: str = typer.Option(None, help="held-out text (default: a few stdlib modules)"),
    max_chars: int = typer.Option(30_000, min=100),
):
    """Perplexity before and after INT8 weight-only quantisation, on held-out text."""
    import json

    from lmforge.serve.loading import load_for_serving
    from lmforge.serve.perplexity import heldout_text, int8_report

    net, tok, _ = load_for_serving(model, tokenizer, "float32", "auto", False)
    if text_file and not os.path.exists(text_file):
        raise LmforgeError(f"no such file: {text_file}")
    text = open(text_file, encoding="utf-8").read()[:max_chars] if text_file else heldout_text(max_chars)
    typer.echo(json.dumps(int8_report(net, tok, text), indent=2))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
    app.command("chat")(chat_command)
    app.command("int8-report")(int8_report_command)
