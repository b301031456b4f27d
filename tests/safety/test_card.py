"""Model card: every figure comes from the run's own files, missing pieces are "not measured"."""
import json

import pytest
import yaml

from lmforge.errors import LmforgeError
from lmforge.safety.card import NOT_MEASURED, build_card, to_markdown, write_card
from lmforge.safety.dp_sgd import dp_train
from tests.safety.test_dp_sgd import dp_recipe


def test_card_of_a_dp_run_reports_its_epsilon(toy_shards, tmp_path):
    out = tmp_path / "run"
    summary = dp_train(dp_recipe(toy_shards, out, "train.max_steps=2", "train.dp.noise_multiplier=1.3"))
    json_path, md_path = write_card(out)
    card = json.loads(json_path.read_text())
    assert card["privacy"]["dp_sgd"] is True
    assert card["privacy"]["epsilon"] == pytest.approx(summary["dp_epsilon"])
    assert card["privacy"]["delta"] == 1e-5
    assert card["training"]["steps"] == 2 and card["training"]["tokens_seen"] == summary["tokens_seen"]
    assert card["model"]["config"]["dim"] == 32 and card["model"]["config"]["vocab_size"] == 128  # the saved model
    assert card["red_team"] == NOT_MEASURED and any("red-team" in x for x in card["limits"])
    assert f"{summary['dp_epsilon']}" in md_path.read_text()


def test_card_of_a_speedrun_report(tmp_path):
    run = tmp_path / "speedrun"
    (run / "train").mkdir(parents=True)
    stages = {"corpus": {"documents": 1800, "bytes": 34_000_000},
              "clean": {"documents_in": 1800, "documents_out": 1650, "removed": {"dedup": {"exact": 150}},
                        "pii": {"email": 42, "ip": 3}, "duplicates": 150},
              "pretrain": {"steps": 300, "tokens_seen": 2_457_600, "final_loss": 2.5, "params": 4_000_000},
              "evaluate": {"bpb": 1.9},
              "redteam": {"attack_success": 0.07}}
    (run / "report.json").write_text(json.dumps({"stages": stages}))
    (run / "train" / "recipe.yaml").write_text(yaml.safe_dump({"train": {"seq_len": 256, "dp": {"enabled": False}}}))
    card = build_card(run)
    assert card["training_data"]["pii"] == {"email": 42, "ip": 3}
    assert card["training_data"]["filters_removed"] == {"dedup": {"exact": 150}}
    assert card["training"]["training_flops_estimate"] == 6 * 4_000_000 * 2_457_600
    assert card["evaluation"]["evaluate"] == {"bpb": 1.9} and card["red_team"] == {"attack_success": 0.07}
    assert card["privacy"]["dp_sgd"] is False and any("without differential privacy" in x for x in card["limits"])
    md = to_markdown(card)
    assert '"email": 42' in md and "Annex IV" in md and "## Red-team results" in md


def test_card_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(LmforgeError, match="not found"):
        build_card(tmp_path / "missing")
    with pytest.raises(LmforgeError, match="no run outputs"):
        build_card(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="not valid JSON"):
        build_card(tmp_path)
