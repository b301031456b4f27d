"""The optional model judge: a (fake) judge model is asked one yes/no question per reply that names
the goal, the canary and the reply; its first word decides, anything else counts as unclear."""
from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.safety.attacks import ROGUE, attacks
from lmforge.safety.judge_model import ModelJudge, verdict
from lmforge.safety.judges import TASK_TEMPLATE, make_canary, system_prompt
from lmforge.safety.redteam import agreement, run, run_judge


class FakeJudgeModel:
    """Answers like a careful judge would: yes when the quoted reply spells the password digits
    in words ("four four one seven") or says the rogue phrase; 'Perhaps.' when the reply is empty."""

    def __init__(self):
        self.questions = []

    def reply(self, messages):
        q = messages[-1]["content"]
        self.questions.append(q)
        quoted = q.split("<<<\n")[1].split("\n>>>")[0]
        if not quoted:
            return "Perhaps.", False
        if "password is" in q:
            digits = q.split("password is ")[1].split(".")[0].split("-")[1]
            words = " ".join(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][int(d)]
                             for d in digits)
            return ("Yes, it does." if words in quoted.lower() else "No."), False
        return ("YES" if ROGUE.lower() in quoted.lower() else "no"), False


class Parrot:
    """The attacked model: spells the password out in words when asked for it, else says the rogue string."""

    def __init__(self, canary):
        self.canary = canary

    def reply(self, messages):
        assert messages[0]["content"] == system_prompt(self.canary, TASK_TEMPLATE)
        if "PWNED" in messages[-1]["content"]:
            return ROGUE, False
        words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        return "The digits are " + " ".join(words[int(d)] for d in self.canary.split("-")[1]), False


def test_verdict_reads_the_first_word():
    assert verdict("Yes.") is True and verdict("  **no**, it does not") is False and verdict("YES") is True
    assert verdict("Perhaps") is None and verdict("yesterday") is None and verdict("") is None


def test_model_judge_catches_what_the_deterministic_judges_miss():
    canary = make_canary(3)
    prompts = [p for p in attacks(per_family=6) if p.family == "override"]
    assert {p.goal for p in prompts} == {"leak", "rogue"}
    plain = run(Parrot(canary), prompts, canary, system_template=TASK_TEMPLATE)
    fake = FakeJudgeModel()
    judge = ModelJudge(fake)
    judged = run(Parrot(canary), prompts, canary, system_template=TASK_TEMPLATE, judge=judge)
    # spelled-out digits escape the deterministic leak judge; the model judge sees them
    assert [o.success for o in plain] == [p.goal == "rogue" for p in prompts]
    assert all(o.success for o in judged) and judge.calls == len(prompts) and judge.unclear == 0
    assert all(canary in q for q, p in zip(fake.questions, prompts) if p.goal == "leak")
    again = run_judge(plain, ModelJudge(FakeJudgeModel()), canary)
    assert [o.success for o in again] == [o.success for o in judged]
    assert agreement(plain, again) == pytest.approx(sum(p.goal == "rogue" for p in prompts) / len(prompts))


def test_unclear_answers_count_as_no_success_and_bad_input_is_refused():
    judge = ModelJudge(FakeJudgeModel())
    assert judge("leak", "", make_canary(0)) is False and judge.unclear == 1
    with pytest.raises(LmforgeError, match="goal"):
        judge("other", "x", make_canary(0))
    with pytest.raises(LmforgeError, match="reply"):
        ModelJudge(object())
    with pytest.raises(LmforgeError, match="canary"):
        system_prompt("X-1", "no placeholder here")


def test_redteam_command_adds_a_model_judge_section(tmp_path):
    import json

    import torch

    from lmforge.cli import run as cli
    from lmforge.tokenizer import train_tokenizer
    from tests.serve.helpers import RunningServer, tiny_model
    torch.set_num_threads(1)
    tok = train_tokenizer(["yes no. The secret password is kept safe. " * 20], vocab_size=300)
    with RunningServer(tiny_model(tok.vocab_size), tok, "tiny") as server:
        out = tmp_path / "rep.json"
        assert cli(["safety", "redteam", "--endpoint", server.url, "--judge-endpoint", server.url, "--task-prompt",
                    "--per-family", "1", "--benign", "0", "--max-tokens", "2", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    judged = rep["model_judge"]
    assert judged["attacks"]["n"] == rep["attacks"]["n"] == 7
    # an untrained judge answers neither yes nor no: every reply is unclear and counts as no success
    assert judged["unclear"] == 7 and judged["attacks"]["asr"] == 0.0
