"""Every reader on good and bad input: bad files, lines and bytes are skipped and counted with
file and line, never crash the run."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.corpus.readers import ReaderConfig, ReadStats, read_inputs
from lmforge.errors import LmforgeError


def _read(paths, **cfg):
    stats = ReadStats()
    docs = list(read_inputs([str(p) for p in paths], ReaderConfig(**cfg), stats))
    return docs, stats


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def test_directory_of_text_markdown_and_code(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("# title\nbody")
    (tmp_path / "sub" / "b.py").write_text("print('hi')\n")
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"zipped text"))
    (tmp_path / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("zstd text é".encode()))
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    docs, stats = _read([tmp_path])
    assert [d.meta["path"] for d in docs] == ["a.md", "c.txt.gz", "d.txt.zst", "sub/b.py"]
    assert [d.text for d in docs[1:3]] == ["zipped text", "zstd text é"]
    assert docs[3].meta["kind"] == "code" and docs[0].meta["kind"] == "text"
    assert docs[0].id == f"{tmp_path.name}:a.md" and docs[0].source == tmp_path.name
    assert stats.skipped == {"unsupported file type": 1}


def test_text_files_bad_bytes_corrupt_archives_and_size_limit(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    gz = gzip.compress(" ".join(str(i) for i in range(200)).encode())
    (tmp_path / "broken.txt.gz").write_bytes(gz[: len(gz) - 6])  # cut inside the checksum trailer
    (tmp_path / "broken.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    (tmp_path / "big.txt").write_text("y" * 2000)
    (tmp_path / "ok.txt").write_text("fine")
    docs, stats = _read([tmp_path], max_file_bytes=1000)
    assert [d.text for d in docs] == ["fine"]
    assert stats.skipped["not UTF-8"] == 1 and stats.skipped["file too large"] == 1
    assert sum(n for r, n in stats.skipped.items() if r.startswith("unreadable or corrupt")) == 2
    assert {e["file"].rsplit("/", 1)[-1] for e in stats.examples} == {"latin1.txt", "broken.txt.gz",
                                                                       "broken.txt.zst", "big.txt"}
    replaced, _ = _read([tmp_path / "latin1.txt"], on_bad_utf8="replace")
    assert replaced[0].text == "caf\ufffd"


def test_jsonl_bad_lines_are_counted_with_line_numbers(tmp_path):
    path = tmp_path / "web.jsonl"
    path.write_bytes(_jsonl([{"text": "one", "url": "http://a.org/x", "lang": "en"}]) + b"{not json\n"
                     + _jsonl([["a list"], {"body": "no text field"}, {"text": 5}]) + b'{"text": "\xff\xfe"}\n'
                     + b"\n" + _jsonl([{"text": "two", "id": "custom-id"}]))
    docs, stats = _read([path])
    assert [d.text for d in docs] == ["one", "two"]
    assert docs[0].meta == {"path": "web.jsonl", "line": 1, "url": "http://a.org/x", "lang": "en"}
    assert docs[0].id == "web:web.jsonl:1" and docs[1].id == "custom-id"
    assert {(e["line"], e["reason"]) for e in stats.examples} == {
        (2, "invalid JSON"), (3, "record is not a JSON object"), (4, "missing or non-string text field 'text'"),
        (5, "missing or non-string text field 'text'"), (6, "not UTF-8")}


def test_jsonl_text_field_and_compression(tmp_path):
    records = [{"content": f"doc {i}"} for i in range(5)]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(records)))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(records)))
    (tmp_path / "c.json").write_text(json.dumps(records))  # whole-file JSON arrays also work
    (tmp_path / "d.json").write_text(json.dumps(records, indent=2))
    docs, stats = _read([tmp_path], text_field="content")
    assert len(docs) == 20 and stats.records == 20 and not stats.skipped


def test_truncated_jsonl_archive_keeps_lines_before_the_damage(tmp_path):
    data = gzip.compress(_jsonl([{"text": "x" * 50 + str(i)} for i in range(2000)]))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    docs, stats = _read([tmp_path / "cut.jsonl.gz"])
    assert 0 < len(docs) < 2000
    [problem] = stats.examples
    assert problem["reason"].startswith("unreadable or corrupt archive") and problem["line"] == len(docs) + 1


def test_parquet_text_column_nulls_missing_column_and_corrupt_file(tmp_path):
    pq.write_table(pa.table({"body": ["a", None, "c"], "url": ["u1", "u2", "u3"]}), tmp_path / "good.parquet")
    pq.write_table(pa.table({"other": ["x"]}), tmp_path / "nocol.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 definitely not parquet PAR1")
    docs, stats = _read([tmp_path], text_field="body")
    assert [d.text for d in docs] == ["a", "c"] and docs[1].meta["url"] == "u3" and docs[1].meta["line"] == 3
    reasons = {(e["file"].rsplit("/", 1)[-1], e["line"], e["reason"].split(" (")[0]) for e in stats.examples}
    assert reasons == {("good.parquet", 2, "missing or non-string text field 'body'"),
                       ("nocol.parquet", None, "no column 'body'"),
                       ("bad.parquet", None, "unreadable or corrupt parquet")}


def test_stdlib_default_and_missing_input():
    docs = []
    for d in read_inputs(None):
        docs.append(d)
        if len(docs) == 3:
            break
    assert all(d.source == "stdlib" and d.meta["split"] in ("train", "val") for d in docs)
    with pytest.raises(LmforgeError, match="input not found"):
        list(read_inputs(["/no/such/path"]))
