"""Corpus readers: the stdlib default, directories of text/markdown/code files, JSONL and Parquet
with a chosen text field, gzip- or zstd-compressed transparently.

Bad input never stops a run: a corrupt archive, an invalid JSON line, a record without the text
field or bytes that are not UTF-8 are skipped and counted in `ReadStats` with file and line.
Files are visited in sorted order, so the document stream (and every output) is deterministic.
"""
from __future__ import annotations

import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.corpus.document import Document
from lmforge.errors import LmforgeError
from lmforge.outputs import MARKER, output_kind

CODE_EXTS = {".py", ".pyi", ".js", ".jsx", ".ts", ".tsx", ".java", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs",
             ".go", ".rs", ".rb", ".php", ".sh", ".bash", ".sql", ".swift", ".kt", ".scala", ".lua", ".r",
             ".jl", ".pl", ".hs", ".ml", ".toml", ".yaml", ".yml", ".ini", ".cfg"}
TEXT_EXTS = {".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org"}
JSONL_EXTS = {".jsonl", ".ndjson", ".json"}
PARQUET_EXTS = {".parquet"}
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


@dataclass
class ReaderConfig:
    text_field: str = "text"
    id_field: str = "id"
    url_field: str = "url"
    source: str = ""  # default: the input's name (directory name or file stem)
    on_bad_utf8: str = "skip"  # skip | replace
    max_file_bytes: int = 64 * 2**20  # larger text/code files are skipped (usually data, not prose)


@dataclass
class ReadStats:
    files: int = 0
    records: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: list = field(default_factory=list)  # first problems, with file and line
    max_examples: int = 100

    def skip(self, file, line: int | None, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append({"file": str(file), "line": line, "reason": reason})

    def as_dict(self) -> dict:
        return {"files": self.files, "records": self.records, "skipped": dict(self.skipped),
                "skipped_total": sum(self.skipped.values()), "examples": self.examples}


def _suffixes(path: Path) -> tuple[str, str | None]:
    """('.jsonl', 'gzip') for data.jsonl.gz; ('.py', None) for a.py."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSED.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    return (suffixes[-1] if suffixes else ""), compression


def kind_of_path(path: str) -> str:
    return "code" if _suffixes(Path(path))[0] in CODE_EXTS else "text"


def open_binary(path: Path):
    kind = _suffixes(path)[1]
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "zstd":
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _corrupt_errors() -> tuple:
    import zstandard
    return (OSError, EOFError, zlib.error, zstandard.ZstdError)


def _decode(data: bytes, cfg: ReaderConfig) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace") if cfg.on_bad_utf8 == "replace" else None


# --- one reader per format --------------------------------------------------------------------------
def read_text_file(path: Path, rel: str, source: str, cfg: ReaderConfig, stats: ReadStats) -> Iterator[Document]:
    try:
        if path.stat().st_size > cfg.max_file_bytes:
            return stats.skip(path, None, "file too large")
        with open_binary(path) as f:
            data = f.read(cfg.max_file_bytes + 1)
            if len(data) <= cfg.max_file_bytes:
                f.read()  # reach the end: a truncated archive only fails at its checksum trailer
    except _corrupt_errors() as e:
        return stats.skip(path, None, f"unreadable or corrupt archive ({type(e).__name__})")
    if len(data) > cfg.max_file_bytes:
        return stats.skip(path, None, "file too large")
    text = _decode(data, cfg)
    if text is None:
        return stats.skip(path, None, "not UTF-8")
    stats.records += 1
    yield Document(id=f"{source}:{rel}", text=text, source=source, meta={"path": rel, "kind": kind_of_path(rel)})


def _record_document(rec, path, rel: str, line: int, source: str, cfg: ReaderConfig, stats: ReadStats):
    if not isinstance(rec, dict):
        return stats.skip(path, line, "record is not a JSON object")
    text = rec.get(cfg.text_field)
    if not isinstance(text, str):
        return stats.skip(path, line, f"missing or non-string text field '{cfg.text_field}'")
    meta = {"path": rel, "line": line}
    for k, v in rec.items():  # keep small scalar metadata (url, lang, split, ...)
        if k != cfg.text_field and isinstance(v, (str, int, float, bool)) and len(str(v)) <= 512:
            meta[k] = v
    if isinstance(rec.get(cfg.url_field), str):
        meta["url"] = rec[cfg.url_field]
    rid = rec.get(cfg.id_field)
    doc_id = str(rid) if isinstance(rid, (str, int)) else f"{source}:{rel}:{line}"
    stats.records += 1
    return Document(id=doc_id, text=text, source=source, meta=meta)


def read_jsonl(path: Path, rel: str, source: str, cfg: ReaderConfig, stats: ReadStats) -> Iterator[Document]:
    line_no = 0
    try:
        with open_binary(path) as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                line = _decode(raw, cfg)
                if line is None:
                    stats.skip(path, line_no, "not UTF-8")
                    continue
                try:
                    rec = json.loads(line)
                except (ValueError, RecursionError):
                    if line_no == 1 and line.lstrip().startswith("["):  # a whole-file JSON array
                        yield from _read_json_array(path, rel, source, cfg, stats)
                        return
                    stats.skip(path, line_no, "invalid JSON")
                    continue
                if isinstance(rec, list) and line_no == 1:  # a one-line JSON array of records
                    for i, item in enumerate(rec, 1):
                        doc = _record_document(item, path, rel, i, source, cfg, stats)
                        if doc is not None:
                            yield doc
                    continue
                doc = _record_document(rec, path, rel, line_no, source, cfg, stats)
                if doc is not None:
                    yield doc
    except _corrupt_errors() as e:
        stats.skip(path, line_no + 1, f"unreadable or corrupt archive ({type(e).__name__})")


def _read_json_array(path, rel, source, cfg, stats):
    try:
        with open_binary(path) as f:
            records = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError, *_corrupt_errors()):
        return stats.skip(path, None, "invalid JSON")
    if not isinstance(records, list):
        return stats.skip(path, None, "JSON file is neither JSON lines nor an array")
    for i, rec in enumerate(records, 1):
        doc = _record_document(rec, path, rel, i, source, cfg, stats)
        if doc is not None:
            yield doc


def read_parquet(path: Path, rel: str, source: str, cfg: ReaderConfig, stats: ReadStats) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        if _suffixes(path)[1] is None:
            handle = path
        else:
            with open_binary(path) as f:
                handle = io.BytesIO(f.read())
        pf = pq.ParquetFile(handle)
        names = set(pf.schema_arrow.names)
        if cfg.text_field not in names:
            return stats.skip(path, None, f"no column '{cfg.text_field}' (columns: {', '.join(sorted(names))})")
        row = 0
        for batch in pf.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                row += 1
                doc = _record_document(rec, path, rel, row, source, cfg, stats)
                if doc is not None:
                    yield doc
    except (pa.ArrowException, *_corrupt_errors()) as e:
        stats.skip(path, None, f"unreadable or corrupt parquet ({type(e).__name__})")


def reader_for(path: Path):
    ext = _suffixes(path)[0]
    if ext in JSONL_EXTS:
        return read_jsonl
    if ext in PARQUET_EXTS:
        return read_parquet
    if ext in CODE_EXTS or ext in TEXT_EXTS:
        return read_text_file
    return None


def _input_files(root: Path, stats: ReadStats) -> list[Path]:
    """Files under an input folder, minus lmforge outputs found inside it (a `data clean --out`
    placed in its own input folder must not be read back as input on the next run)."""
    files, outputs = [], []
    for p in sorted(root.rglob("*")):
        if any(p.is_relative_to(o) for o in outputs):
            continue
        if p.is_dir() and output_kind(p) is not None:
            outputs.append(p)
            stats.skipped["lmforge output folder"] += 1
        elif p.is_file() and p.name != MARKER:
            files.append(p)
    return files


def read_inputs(inputs: list | None = None, cfg: ReaderConfig | None = None,
                stats: ReadStats | None = None) -> Iterator[Document]:
    """Documents of every input in order; `None`, `[]` or 'stdlib' means the embedded stdlib corpus."""
    cfg = cfg or ReaderConfig()
    stats = stats if stats is not None else ReadStats()
    for item in inputs or ["stdlib"]:
        if str(item) == "stdlib":
            from lmforge.corpus.stdlib import stdlib_documents
            for doc in stdlib_documents():
                stats.records += 1
                yield doc
            continue
        root = Path(item)
        if not root.exists():
            raise LmforgeError(f"input not found: {item}")
        source = cfg.source or (root.name if root.is_dir() else root.name.split(".")[0])
        files = _input_files(root, stats) if root.is_dir() else [root]
        for path in files:
            rel = path.relative_to(root).as_posix() if root.is_dir() else path.name
            reader = reader_for(path)
            if reader is None:
                if not root.is_dir():
                    raise LmforgeError(f"{path}: unsupported file type (text, code, JSONL or Parquet, "
                                       f"optionally .gz/.zst)")
                stats.skipped["unsupported file type"] += 1
                continue
            stats.files += 1
            yield from reader(path, rel, source, cfg, stats)
