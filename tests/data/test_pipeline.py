import json
import re

import pytest

from lmforge.data.config import PipelineConfig
from lmforge.data.executors import LocalExecutor
from lmforge.data.pipeline import clean_corpus
from lmforge.data.report import STAGES, print_report
from lmforge.data.toxicity import LexiconScorer
from lmforge.errors import LmforgeError
from tests.data.corpus import messy_corpus, write_eval_set

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")


def small_config(tmp_path, **engine) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.decontam.eval_sets = [write_eval_set(tmp_path / "eval.jsonl")]
    cfg.engine.batch_docs = 20  # several batches and output parts
    cfg.engine.workers = engine.get("workers", 1)
    return cfg


def _parts_bytes(result) -> list[bytes]:
    return [p.read_bytes() for p in result.parts]


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    docs, expect = messy_corpus()
    result = clean_corpus(docs, tmp / "out", small_config(tmp))
    return docs, expect, result


def test_each_stage_removes_what_it_should(cleaned):
    docs, expect, result = cleaned
    kept = {d.id for d in result.documents()}
    for key in ("quality", "toxic", "decontam"):
        assert not kept & set(expect[key]), key
    for key in ("exact", "url", "near"):  # one document of each duplicate group survives
        assert len(kept & set(expect[key])) == 1, key
    assert "pii" in kept
    stages = result.report["stages"]
    assert stages["exact_dedup"]["removed"] == {"exact duplicate": 1}
    assert stages["url_dedup"]["removed"] == {"duplicate URL": 1}
    assert stages["near_dedup"]["removed"] == {"near duplicate": 1}
    assert stages["toxicity"]["removed"] == {"toxic": 1}
    assert stages["decontam"]["removed"] == {"13-gram overlap": 1}
    assert sum(stages["quality"]["removed"].values()) == 2


def test_report_is_consistent_from_stage_to_stage(cleaned):
    docs, _, result = cleaned
    report = json.loads((result.out_dir / "report.json").read_text())
    assert report == result.report
    chain = [report["stages"][s] for s in STAGES]
    assert chain[0]["docs_in"] == len(docs)
    for before, after in zip(chain, chain[1:]):
        assert before["docs_out"] == after["docs_in"] and before["bytes_out"] == after["bytes_in"]
    assert chain[-1]["docs_out"] == report["documents_out"] == len(result) == len(list(result))
    for s in chain:
        assert s["docs_in"] - s["docs_out"] == sum(s["removed"].values())
    assert report["duplicates"]["rate_before"] == pytest.approx(3 / len(docs))
    assert report["duplicates"]["rate_after"] == 0.0
    assert report["throughput"]["docs_per_s"] > 0 and report["batches"] == -(-len(docs) // 20)


def test_pii_is_redacted_and_counted(cleaned):
    _, _, result = cleaned
    texts = {d.id: d for d in result.documents()}
    assert not any(EMAIL.search(d.text) for d in texts.values())
    assert "<EMAIL>" in texts["pii"].text and "<PHONE>" in texts["pii"].text
    assert texts["pii"].meta["pii"] == {"email": 1, "phone": 1, "credit_card": 1}
    assert result.report["pii"] == {"email": 1, "phone": 1, "credit_card": 1}


def test_report_table_prints(cleaned, capsys):
    from rich.console import Console
    print_report(cleaned[2].report, Console(width=120, force_terminal=False))
    out = capsys.readouterr().out
    assert "near_dedup" in out and "exact duplicate 1" in out and "PII redacted: credit_card 1" in out


def test_outputs_do_not_depend_on_worker_count(cleaned, tmp_path):
    docs, _, one = cleaned
    two = clean_corpus(docs, tmp_path / "two", small_config(tmp_path, workers=2))
    assert two.report["workers"] == 2
    assert _parts_bytes(one) == _parts_bytes(two)


class FailingScorer(LexiconScorer):
    """The default scorer, except that it raises on its n-th call, like a run killed half-way."""

    def __init__(self, fail_on: int):
        super().__init__()
        self.calls, self.fail_on = 0, fail_on

    def score(self, texts):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated crash")
        return super().score(texts)


def test_interrupted_run_resumes_and_skips_finished_parts(cleaned, tmp_path):
    docs, _, reference = cleaned
    cfg = small_config(tmp_path)
    cfg.toxicity.enabled = True
    with pytest.raises(RuntimeError, match="simulated crash"):
        clean_corpus(docs, tmp_path / "out", cfg, toxicity_scorer=FailingScorer(fail_on=3))
    finished = sorted((tmp_path / "out" / "docs").glob("part_*"))
    assert len(finished) == 2 and not list((tmp_path / "out").rglob(".*.tmp"))
    mtimes = [p.stat().st_mtime_ns for p in finished]
    resumed = clean_corpus(docs, tmp_path / "out", cfg)
    n_batches = -(-len(docs) // 20)
    assert resumed.report["resumed"] == {"normalize_batches_skipped": n_batches, "filter_batches_skipped": 2}
    assert [p.stat().st_mtime_ns for p in finished] == mtimes
    assert _parts_bytes(resumed) == _parts_bytes(reference)
    assert resumed.report["stages"] == reference.report["stages"]


def test_changed_config_starts_over_and_bad_input_is_an_error(cleaned, tmp_path):
    docs, _, _ = cleaned
    cfg = small_config(tmp_path)
    clean_corpus(docs[:30], tmp_path / "out", cfg)
    cfg.near.threshold = 0.7
    again = clean_corpus(docs[:30], tmp_path / "out", cfg)
    assert again.report["notes"] == ["configuration changed since the last run: started over"]
    with pytest.raises(LmforgeError, match="Document objects"):
        clean_corpus(["plain strings"], tmp_path / "bad", cfg)


def test_stages_can_be_switched_off(cleaned, tmp_path):
    docs, _, _ = cleaned
    cfg = small_config(tmp_path)
    for section in (cfg.exact, cfg.near, cfg.quality, cfg.pii, cfg.toxicity, cfg.decontam):
        section.enabled = False
    cfg.normalize.url_dedup = False
    result = clean_corpus(docs, tmp_path / "off", cfg, executor=LocalExecutor(1))
    assert result.report["documents_out"] == len(docs)
    assert list(result.report["stages"]) == ["normalize"]
