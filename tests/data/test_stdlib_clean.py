"""The speedrun's data stage on the real stdlib corpus: real duplicates, real author e-mails."""
import re
import time

import pytest

from lmforge.data.config import PipelineConfig
from lmforge.data.pipeline import clean_corpus
from lmforge.data.shards import TokenShards
from lmforge.corpus.stdlib import stdlib_documents
from lmforge.data.token_shards import write_token_shards
from lmforge.tokenizer import train_tokenizer

EMAIL = re.compile(rb"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")


@pytest.mark.slow
def test_stdlib_clean_removes_duplicates_and_no_email_reaches_the_shards(tmp_path):
    before = sum(len(EMAIL.findall(d.text.encode())) for d in stdlib_documents())
    t = time.perf_counter()
    cleaned = clean_corpus(stdlib_documents(), tmp_path / "clean", PipelineConfig())
    seconds = time.perf_counter() - t
    report = cleaned.report
    print(f"\nstdlib clean: {report['documents_in']} -> {report['documents_out']} documents in {seconds:.1f} s; "
          f"PII {report['pii']}; duplicates {report['duplicates']['rate_before']:.1%} -> "
          f"{report['duplicates']['rate_after']:.2%}")
    assert before > 1000 and report["pii"]["email"] > 1000
    assert report["stages"]["exact_dedup"]["removed"]["exact duplicate"] > 20
    assert report["stages"]["near_dedup"]["removed"]["near duplicate"] > 10
    assert any("encodings/" in c["members"][0] for c in report["duplicates"]["largest_clusters"])
    assert report["duplicates"]["rate_after"] < 0.01
    assert seconds < 120  # ~15-30 s on 2 shared cores; the bound only catches pathologies

    kept = list(cleaned.documents())
    assert not any(EMAIL.search(d.text.encode()) for d in kept)  # an independent, standard e-mail regex
    # and through tokenisation: shards of every document that had PII, decoded back to bytes
    redacted = [d for d in kept if "email" in d.meta.get("pii", {})]
    tok = train_tokenizer([d.text for d in redacted[:100]], kind="byte-bpe", vocab_size=1024)
    write_token_shards(redacted, tok, tmp_path / "tokens")
    decoded = b""
    for split in ("train", "val"):
        shards = TokenShards(tmp_path / "tokens", split)
        tokens = shards.slice(0, len(shards))
        decoded += tok.decode_bytes(tokens[tokens != shards.eos_id].tolist())
    assert len(redacted) > 150 and b"<EMAIL>" in decoded
    assert EMAIL.findall(decoded) == []
