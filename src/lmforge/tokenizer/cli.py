"""`lmforge tokenizer train|encode`."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from lmforge.corpus.readers import read_inputs
from lmforge.errors import LmforgeError

app = typer.Typer(help="Train and inspect tokenizers.", no_args_is_help=True)


def _read_texts(inputs: list[Path]):
    """The inputs' texts, read the way `data clean` reads them (text/code files, JSONL, Parquet,
    .gz/.zst), so a `data clean` output folder (docs/part_*.jsonl.zst) is a valid input."""
    return (doc.text for doc in read_inputs([str(p) for p in inputs]))


@app.command("train")
def train_command(
    inputs: list[Path] = typer.Argument(None, help="text files or directories (default: the stdlib corpus)"),
    out: Path = typer.Option(Path("runs/tokenizer"), "--out", "-o"),
    kind: str = typer.Option("byte-bpe", help="byte-bpe, bpe or unigram"),
    vocab_size: int = typer.Option(4096, min=1),
    split_digits: bool = typer.Option(False, "--split-digits", help="one token per digit (as Llama's and SmolLM's tokenizers)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into a non-empty folder that is not an lmforge output (its other files are kept)"),
):
    """Train a tokenizer and report its compression on held-out text."""
    from rich.console import Console

    from lmforge.corpus.stdlib import stdlib_documents
    from lmforge.outputs import check_destination
    from lmforge.tokenizer import compression_report, train_tokenizer

    check_destination(out, "tokenizer", overwrite)  # before minutes of training, not after
    if inputs:
        missing = [str(p) for p in inputs if not p.exists()]
        if missing:
            raise LmforgeError(f"input not found: {', '.join(missing)}")
        texts = [t for t in _read_texts(inputs) if t.strip()]
        if not texts:
            raise LmforgeError("the inputs hold no non-empty UTF-8 text to train on")
        held_out, train_texts = texts[: max(1, len(texts) // 20)], texts[max(1, len(texts) // 20):] or texts
    else:
        train_texts = (d.text for d in stdlib_documents("train"))
        held_out = [d.text for d in stdlib_documents("val")]
    tok = train_tokenizer(train_texts, kind=kind, vocab_size=vocab_size, show_progress=True, split_digits=split_digits)
    tok.save(out, overwrite=overwrite)
    report = compression_report(tok, held_out)
    (out / "compression.json").write_text(json.dumps(report, indent=2))
    Console().print(f"saved {out / 'tokenizer.json'} (vocab {tok.vocab_size}); held-out: "
                    f"{report['bytes_per_token']:.2f} bytes/token, {report['tokens_per_word']:.2f} tokens/word")


@app.command("encode")
def encode_command(tokenizer: Path = typer.Option(..., "--tokenizer", "-t"), text: str = typer.Argument(...)):
    """Print the token ids and pieces of a text."""
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    ids = tok.encode(text)
    typer.echo(json.dumps({"ids": ids, "pieces": [tok.hf.id_to_token(i) for i in ids]}, ensure_ascii=False))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="tokenizer")
