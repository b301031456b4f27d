"""Task logic on the self-written sample files: readers, prompts, answer extraction, metrics.
A scripted backend gives known answers, so every metric is checked against an exact value."""
import math

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval.tasks import make_task
from lmforge.eval.tasks.math_word import extract_answer, normalize_number, reference_answer
from lmforge.eval.tasks.mc_formats import read_multiple_choice
from lmforge.eval.tasks.needle import insert_needle, synthetic_haystack

from .conftest import DATA


def run(task, backend, out_dir=None):
    items = task.items()
    results = []
    for start in range(0, len(items), task.chunk_size):
        results += task.evaluate(backend, items[start: start + task.chunk_size])
    return items, task.aggregate(items, results, out_dir)


# --- multiple choice ------------------------------------------------------------------------
def test_readers_normalise_every_format():
    mmlu, bad = read_multiple_choice(DATA / "mmlu_style")
    assert bad == 0 and len(mmlu) == 10
    spider = next(q for q in mmlu if "spider" in q["question"])
    assert spider == {"question": "How many legs does a spider have?", "choices": ["6", "8", "10", "4"],
                      "answer": 1, "subject": "counting"}
    ceval, _ = read_multiple_choice(DATA / "ceval_style.csv")
    assert [q["answer"] for q in ceval] == [2, 1, 3, 0] and ceval[0]["choices"] == ["5", "6", "7", "8"]
    arc, bad = read_multiple_choice(DATA / "arc_style.jsonl")
    assert bad == 1  # the non-JSON line is skipped and counted
    assert [q["answer"] for q in arc] == [0, 1, 0, 1]  # letter, numeric label, HF-style, index
    assert arc[1]["choices"] == ["grow faster", "turn pale and weak", "produce more flowers"]


def test_letter_prompt_has_header_shots_and_choices():
    task = make_task(f"mmlu:{DATA / 'mmlu_style'}", {"shots": 2})
    item = next(it for it in task.items() if "spider" in it["prompt"].split("\n\n")[-1])
    assert item["prompt"].startswith("The following are multiple choice questions (with answers) about counting.\n\n")
    assert item["prompt"].count("Answer:") == 3  # two shots with answers, then the question
    assert item["prompt"].endswith("How many legs does a spider have?\nA. 6\nB. 8\nC. 10\nD. 4\nAnswer:")
    assert item["continuations"] == [" A", " B", " C", " D"] and item["answer"] == 1


def test_accuracy_and_length_normalised_accuracy(scripted):
    # log-likelihood = -(bytes of the continuation): raw accuracy picks the shortest choice, while
    # the length-normalised score is equal for all choices (ties go to the first one)
    backend = scripted(loglikelihood=lambda ctx, cont: (-float(len(cont.encode())), False))
    items, out = run(make_task(f"arc:{DATA / 'arc_style.jsonl'}"), backend)
    shortest = [min(range(len(it["continuations"])), key=lambda i: len(it["continuations"][i])) for it in items]
    expected = sum(s == it["answer"] for s, it in zip(shortest, items)) / len(items)
    assert out["metrics"]["acc"] == pytest.approx(expected)
    assert out["metrics"]["acc_norm"] == pytest.approx(sum(it["answer"] == 0 for it in items) / len(items))
    p = out["metrics"]["acc"]
    assert out["stderr"]["acc"] == pytest.approx(math.sqrt(p * (1 - p) / (len(items) - 1)))


def test_perfect_model_scores_one(scripted):
    answers = {}
    task = make_task(f"mc:{DATA / 'mmlu_style'}", {"shots": 1})
    for it in task.items():
        answers[it["prompt"]] = it["continuations"][it["answer"]]
    backend = scripted(loglikelihood=lambda ctx, cont: (0.0 if answers[ctx] == cont else -5.0, True))
    _, out = run(task, backend)
    assert out["metrics"] == {"acc": 1.0, "acc_norm": 1.0}
    assert out["details"]["acc_by_subject"] == {"counting": 1.0, "kitchen science": 1.0}


def test_too_few_shots_is_a_clear_error():
    with pytest.raises(LmforgeError, match="few-shot"):
        make_task(f"mc:{DATA / 'mmlu_style' / 'counting_test.csv'}", {"shots": 5}).items()


# --- GSM8K ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, strict, flexible", [
    ("3 * 4 = 12 pencils.\n#### 12", "12", "12"),
    ("So the answer is $1,250.00.", "1250", "1250"),
    ("First 2 + 3 = 5, then 5 * 2 = 10.", None, "10"),
    ("The answer is: -7", "-7", "-7"),
    ("no numbers here", None, None),
    ("#### 2.50", "2.5", "2.5"),
])
def test_answer_extraction(text, strict, flexible):
    assert extract_answer(text, "strict") == strict
    assert extract_answer(text, "flexible") == flexible


def test_number_normalisation():
    assert normalize_number("3.0") == normalize_number("3") == "3"
    assert normalize_number("$2,000.") == "2000"
    assert reference_answer("1,250 + 750 = 2,000.\n#### 2,000") == "2000"


def test_gsm8k_exact_match_and_majority_vote(scripted):
    task = make_task(f"gsm8k:{DATA / 'gsm8k_style.jsonl'}", {"shots": 2, "samples": 3})
    items = task.items()
    assert len(items) == 5 and items[0]["prompt"].count("Question:") == 3
    truth = {it["prompt"]: it["reference"] for it in items}

    def generate(req):
        ref = truth[req.prompt]
        if req.temperature == 0:  # greedy: right on the first two problems only
            return f" ... #### {ref}" if ref in ("105", "5") else " I think 1.\n#### 1"
        # samples: two votes for the right answer, one wrong (seed decides which)
        return f" it is {ref}" if req.seed % 3 else " it is 999"

    _, out = run(task, scripted(generate=generate))
    assert out["metrics"]["exact_match_strict"] == pytest.approx(2 / 5)
    assert out["metrics"]["exact_match_flexible"] == pytest.approx(2 / 5)
    assert out["metrics"]["maj@3"] == 1.0


# --- code ---------------------------------------------------------------------------------------
def test_humaneval_format_pass_at_1_counts_exactly(scripted, tmp_path):
    task = make_task(f"humaneval:{DATA / 'humaneval_style.jsonl'}", {"timeout": 3.0, "workers": 2})
    solutions = {it["problem"]["prompt"]: it["problem"]["canonical_solution"] for it in task.items()}
    wrong = {"def add", "def count_vowels"}  # two of the four get a wrong body

    def generate(req):
        good = solutions[req.prompt]
        return "    return None\n" if any(w in req.prompt for w in wrong) else good + "\ndef unrelated():\n    pass\n"

    items, out = run(task, scripted(generate=generate), tmp_path)
    assert out["metrics"] == {"pass@1": 0.5}
    assert out["details"]["statuses"] == {"passed": 2, "failed": 2}
    assert (tmp_path / "humaneval_samples.jsonl").exists()


def test_humaneval_stop_sequences_cut_trailing_code():
    from lmforge.eval.stop_strings import truncate_at_stop
    from lmforge.eval.tasks.code_problems import HUMANEVAL_STOP

    text = "    return a + b\n\n\ndef main():\n    print(add(1, 2))\n"
    assert truncate_at_stop(text, HUMANEVAL_STOP) == "    return a + b\n\n"


def test_chat_mode_reads_the_fenced_function(scripted):
    task = make_task(f"humaneval:{DATA / 'humaneval_style.jsonl'}", {"chat": True, "limit": 2, "timeout": 3.0})
    sources = {"add": "def add(a, b):\n    return a + b\n", "is_palindrome": "def is_palindrome(t):\n    return t == t[::-1]\n"}

    def generate(req):
        assert req.chat and "```python" in req.prompt
        name = next(n for n in sources if f"def {n}(" in req.prompt)
        return f"Sure! Here it is:\n```python\n{sources[name]}```\nHope this helps."

    _, out = run(task, scripted(generate=generate))
    assert out["metrics"]["pass@1"] == 1.0


def test_mbpp_prompt_shots_and_scoring(scripted):
    task = make_task(f"mbpp:{DATA / 'mbpp_style.jsonl'}", {"shots": 2, "timeout": 3.0})
    items = task.items()
    assert [it["key"] for it in items] == ["3", "4", "5", "6"]  # the first two tasks are the shots
    prompt = task.request_for(items[0]["problem"], 0).prompt
    assert prompt.count("[BEGIN]") == 3 and prompt.count("[DONE]") == 2 and prompt.endswith("[BEGIN]\n")
    codes = {it["problem"]["text"]: it["problem"]["code"] for it in items}

    def generate(req):
        text = req.prompt.rsplit("here is your task: ", 1)[1].split(" Your code", 1)[0]
        return codes[text] if "smallest" not in text else "def smallest(xs):\n    return max(xs)"

    _, out = run(task, scripted(generate=generate))
    assert out["metrics"]["pass@1"] == 0.75  # test_setup_code (SEP) is honoured for task 6


def test_pass_at_k_with_several_samples(scripted):
    task = make_task(f"humaneval:{DATA / 'humaneval_style.jsonl'}",
                     {"samples": 4, "k": [1, 2, 4], "limit": 2, "timeout": 3.0})
    solutions = {it["problem"]["prompt"]: it["problem"]["canonical_solution"] for it in task.items()}

    def generate(req):  # problem 0: 1 of 4 samples right; problem 1: 2 of 4
        right = req.seed in ((0,) if "def add" in req.prompt else (0, 1))
        return solutions[req.prompt] if right else "    return 'nope'\n"

    _, out = run(task, scripted(generate=generate))
    assert out["metrics"]["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert out["metrics"]["pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)
    assert out["metrics"]["pass@4"] == 1.0


# --- needle -----------------------------------------------------------------------------------
def test_needle_insertion_depths():
    hay = synthetic_haystack(2000, seed=1)
    assert synthetic_haystack(2000, seed=1) == hay and len(hay) >= 2000
    start, end = insert_needle(hay, "NEEDLE.", 0.0), insert_needle(hay, "NEEDLE.", 1.0)
    assert start.startswith("NEEDLE.") and end.rstrip().endswith("NEEDLE.")
    middle = insert_needle(hay, "NEEDLE.", 0.5)
    assert 0.4 < middle.index("NEEDLE.") / len(middle) < 0.6


def test_needle_sweep_grid_and_heatmap(scripted, tmp_path):
    task = make_task("needle", {"context_lengths": [128, 256], "depths": [0.0, 0.5, 1.0], "trials": 2})
    backend = scripted()
    task.backend = backend

    def generate(req):  # finds the needle only when it is in the first 30% of the prompt
        value = req.prompt.split("magic number is ")[1].split(".")[0]
        return f" {value}." if req.prompt.index(value) < 0.3 * len(req.prompt) else " 11111."

    backend._gen = generate
    items, out = run(task, backend, tmp_path)
    assert len(items) == 2 * 3 * 2
    assert out["details"]["accuracy_grid"] == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert out["metrics"]["accuracy"] == pytest.approx(4 / 12)
    png = tmp_path / "needle_heatmap.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


# --- bpb ----------------------------------------------------------------------------------------
def test_bpb_from_rolling_loglikelihood(scripted):
    # 1 bit per byte exactly: nats = -bytes * ln 2
    backend = scripted(rolling=lambda text: (-len(text.encode()) * math.log(2), len(text.split())))
    items, out = run(make_task(f"bpb:{DATA / 'held_out.jsonl'}"), backend)
    assert len(items) == 3  # the row without a text field is skipped
    assert out["metrics"]["bits_per_byte"] == pytest.approx(1.0)
    assert out["metrics"]["byte_perplexity"] == pytest.approx(2.0)
    assert out["stderr"]["bits_per_byte"] == pytest.approx(0.0, abs=1e-12)


def test_bpb_on_a_real_model_is_finite_and_matches_definition(tiny_backend):
    task = make_task(f"bpb:{DATA / 'held_out.txt'}")
    items, out = run(task, tiny_backend)
    (nats, tokens), = tiny_backend.loglikelihood_rolling([items[0]["text"]])
    assert out["metrics"]["bits_per_byte"] == pytest.approx(-nats / math.log(2) / len(items[0]["text"].encode()))
    assert out["metrics"]["token_perplexity"] == pytest.approx(math.exp(-nats / tokens))


def test_unknown_task_and_missing_file_are_clear_errors():
    with pytest.raises(LmforgeError, match="unknown task"):
        make_task("hellaswagg")
    with pytest.raises(LmforgeError, match="not found"):
        make_task("mc:/nonexistent/file.csv").items()
    with pytest.raises(LmforgeError, match="unknown key"):
        make_task("humaneval", {"sampels": 3})
