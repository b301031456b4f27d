"""`lmforge data clean|shards|report|pii-bench`."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from lmforge.errors import LmforgeError

app = typer.Typer(help="Clean corpora (dedup, quality, PII, toxicity, decontamination) and write token shards.",
                  no_args_is_help=True)


def _split_args(args: list[str] | None) -> tuple[list[str], list[str]]:
    """Positional arguments are inputs (paths or 'stdlib') or key=value overrides."""
    inputs, overrides = [], []
    for a in args or []:
        (overrides if "=" in a and not Path(a).exists() else inputs).append(a)
    return inputs, overrides


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"--out {out} is a file; give a directory")


def _config(recipe: Path | None, overrides: list[str], extra: list[str]):
    from lmforge.config import load_recipe
    from lmforge.data.config import PipelineConfig
    return load_recipe(PipelineConfig, recipe, extra + overrides)


@app.command("clean")
def clean_command(
    args: list[str] = typer.Argument(None, help="inputs (directories, text/code/JSONL/Parquet files, .gz/.zst, "
                                                 "or 'stdlib', the default) and section.key=value overrides, "
                                                 "e.g. near.threshold=0.7 quality.enabled=false"),
    out: Path = typer.Option(Path("runs/data/clean"), "--out", "-o", help="output directory"),
    engine: str = typer.Option(None, "--engine", help="local (default) or ray"),
    workers: int = typer.Option(None, "--workers", "-w", min=1, help="worker processes (default: all CPUs)"),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="YAML recipe with the same sections"),
    text_field: str = typer.Option(None, "--text-field", help="JSONL/Parquet field holding the text"),
    eval_set: list[str] = typer.Option(None, "--eval-set", help="decontaminate against: 'humaneval' or a "
                                                                  "JSONL file[:field]; repeatable"),
    keep_work: bool = typer.Option(False, "--keep-work", help="keep the normalised spill files"),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into a non-empty folder that is not an lmforge output (its other files are kept)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Normalise, deduplicate (URL, exact, MinHash-LSH), filter (quality, toxicity), redact PII and
    decontaminate a corpus; writes docs/part_*.jsonl.zst and report.json to --out."""
    from rich.console import Console

    from lmforge.data.pipeline import clean_corpus
    from lmforge.corpus.readers import ReadStats, read_inputs
    from lmforge.data.report import print_report

    _check_out_dir(out)
    inputs, overrides = _split_args(args)
    extra = [f"engine.engine={engine}"] if engine else []
    extra += [f"engine.workers={workers}"] if workers is not None else []
    extra += [f"read.text_field={text_field}"] if text_field else []
    if eval_set:
        extra.append("decontam.eval_sets=" + json.dumps(list(eval_set)))
    cfg = _config(recipe, overrides, extra)
    console = Console()
    stats = ReadStats()
    result = clean_corpus(read_inputs(inputs, cfg.read, stats), out, cfg, read_stats=stats,
                          progress=progress, console=console, keep_work=keep_work, overwrite=overwrite)
    print_report(result.report, console)
    console.print(f"cleaned documents: {out / 'docs'}  report: {out / 'report.json'}", highlight=False)


@app.command("shards")
def shards_command(
    args: list[str] = typer.Argument(None, help="a `data clean` output directory, or inputs as for clean; "
                                                 "plus overrides such as tokens.val_fraction=0.1 "
                                                 "mixing.weights='{web: 0.5, code: 2}'"),
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="tokenizer directory or tokenizer.json"),
    out: Path = typer.Option(Path("runs/data/shards"), "--out", "-o"),
    recipe: Path = typer.Option(None, "--recipe", "-r"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into a non-empty folder that is not an lmforge output (its other files are kept)"),
):
    """Tokenise documents into train/val token shards (the pretraining loader's format)."""
    from rich.console import Console

    from lmforge.data.pipeline import CleanResult
    from lmforge.corpus.readers import read_inputs
    from lmforge.data.token_shards import write_token_shards
    from lmforge.tokenizer import load_tokenizer

    _check_out_dir(out)
    inputs, overrides = _split_args(args)
    cfg = _config(recipe, overrides, [])
    if len(inputs) == 1 and (Path(inputs[0]) / "report.json").exists():
        report = json.loads((Path(inputs[0]) / "report.json").read_text())
        parts = sorted((Path(inputs[0]) / "docs").glob("part_*.jsonl.zst"))
        documents = CleanResult(Path(inputs[0]), report, parts)
    else:
        documents = read_inputs(inputs, cfg.read)
    tok = load_tokenizer(tokenizer)
    summary = write_token_shards(documents, tok, out, val_fraction=cfg.tokens.val_fraction,
                                 shard_tokens=cfg.tokens.shard_tokens, mixing=cfg.mixing,
                                 batch_docs=cfg.tokens.batch_docs, progress=progress, overwrite=overwrite)
    console = Console()
    for split, s in sorted(summary["splits"].items()):
        console.print(f"{split}: {s['tokens']:,} tokens, {s['documents']:,} documents, {s['shards']} shard(s)")
    console.print(f"shards in {out}", highlight=False)


@app.command("report")
def report_command(run_dir: Path = typer.Argument(..., help="a `data clean` output directory")):
    """Print the report of a finished clean run."""
    from lmforge.data.report import print_report
    path = run_dir / "report.json" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise LmforgeError(f"no report at {path}")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path} is not a report.json written by `lmforge data clean` ({e})") from None
    try:
        print_report(report)
    except (KeyError, TypeError, AttributeError):
        raise LmforgeError(f"{path} is not a report.json written by `lmforge data clean`") from None


@app.command("pii-bench")
def pii_bench_command(
    docs: int = typer.Option(1000, "--docs", min=1, help="documents to generate"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    real: bool = typer.Option(False, "--real", help="score on stdlib docstrings, comments and code with "
                                                    "faker PII values inserted (exact spans), against Presidio"),
    faker_locales: str = typer.Option(None, "--faker-locales", help="comma-separated faker locales (with --real; "
                                                                     "default en_US,en_GB,de_DE,fr_FR,it_IT,ja_JP)"),
    presidio: bool = typer.Option(True, "--presidio/--no-presidio", help="also score Presidio (with --real)"),
):
    """Precision and recall of PII detection: on a labelled synthetic benchmark generated in code, or
    with --real on real stdlib text with faker values inserted."""
    from rich.console import Console
    from rich.table import Table

    if real:
        from lmforge.data.pii_eval import DEFAULT_LOCALES
        from lmforge.data.pii_eval import evaluate as evaluate_real
        locales = [loc.strip() for loc in (faker_locales or ",".join(DEFAULT_LOCALES)).split(",") if loc.strip()]
        result = evaluate_real(docs, seed, locales, presidio=presidio)
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        table = Table(title=f"PII on real text: {result['documents']} stdlib windows + faker values "
                            f"({', '.join(locales)}), seed {seed}, exact spans")
        for col in ("type", "detector", "precision", "recall", "partial", "inserted", "agree"):
            table.add_column(col, justify="left" if col in ("type", "detector") else "right")
        for kind in [*result["detectors"]["lmforge"]["per_type"], "all"]:
            for name, d in result["detectors"].items():
                r = d["overall"] if kind == "all" else d["per_type"][kind]
                agree = result.get("agreement", {}).get(kind, {}).get("agreement")
                table.add_row(kind, name, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['partial']:,}",
                              f"{r['support']:,}", "" if agree is None or name != "lmforge" else f"{agree:.3f}")
        console = Console()
        console.print(table)
        for name, d in result["detectors"].items():
            console.print(f"{name}: detections in the untouched base text {d['base_text_detections']} "
                          f"({d['preexisting_emails']} pre-existing e-mails not counted)", highlight=False)
        return

    from lmforge.data.pii_bench import evaluate

    result = evaluate(docs, seed)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"PII benchmark: {docs} synthetic documents, seed {seed}")
    for col in ("type", "precision", "recall", "labelled spans"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for name, r in [*result["per_type"].items(), ("all", result["overall"])]:
        table.add_row(name, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['support']:,}")
    Console().print(table)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="data")
