"""The `lmforge` model type for lm-evaluation-harness gives the same answers as lm-eval's own
Hugging Face backend on the same model (log-likelihood, rolling, generation), and runs a task."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import DATA

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lmforge[lmeval]')")
pytest.importorskip("accelerate", reason="lm-eval's HF backend needs accelerate (lm-eval[hf])")


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    import lmforge.eval.lm_eval_adapter  # noqa: F401  registers "lmforge"
    from lm_eval.api.registry import get_model

    extra = {"batch_size": 4, "device": "cpu"}
    return (get_model("lmforge").create_from_arg_string(f"pretrained={tiny_model_dir}", extra),
            get_model("hf").create_from_arg_string(f"pretrained={tiny_model_dir}", extra))


def instances(kind, args):
    from lm_eval.api.instance import Instance
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_equals_lm_eval_hf_backend(models):
    ours, hf = models
    reqs = instances("loglikelihood", [("Question: What is 2 + 2?\nAnswer:", " 4"), ("A. red\nB. blue\nAnswer:", " B"),
                                       ("The quick", " brown fox jumps"), ("Answer: ", "yes")])
    for (lp, greedy), (ref_lp, ref_greedy) in zip(ours.loglikelihood(reqs), hf.loglikelihood(reqs)):
        assert lp == pytest.approx(ref_lp, abs=1e-3) and greedy == ref_greedy


def test_rolling_and_generation_equal_lm_eval_hf_backend(models):
    ours, hf = models
    rolling = instances("loglikelihood_rolling", [("The lighthouse keeper wrote the weather in a notebook.",)])
    assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(hf.loglikelihood_rolling(rolling)[0], abs=1e-3)
    gen = instances("generate_until", [("The quick brown", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}),
                                       ("def add(a, b):", {"until": ["def"], "max_gen_toks": 8})])
    assert ours.generate_until(gen) == hf.generate_until(gen)


@pytest.mark.slow
def test_simple_evaluate_runs_a_task_with_the_lmforge_model(tiny_model_dir, tmp_path):
    (tmp_path / "toy.yaml").write_text((DATA / "lm_eval_task" / "toy.yaml").read_text().replace(
        "DATA_FILE", str(DATA / "lm_eval_toy.jsonl")))
    script = (
        "import json, sys\nimport lmforge.eval.lm_eval_adapter\nimport lm_eval\nfrom lm_eval.tasks import TaskManager\n"
        "tm = TaskManager(include_path=sys.argv[2])\nout = {}\n"
        "for m in ('lmforge', 'hf'):\n"
        "    r = lm_eval.simple_evaluate(model=m, model_args='pretrained=' + sys.argv[1], tasks=['lmforge_toy_mc'],\n"
        "                                task_manager=tm, device='cpu', batch_size=4)\n"
        "    out[m] = r['results']['lmforge_toy_mc']\nprint(json.dumps(out))\n")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"), "HF_HOME": str(tmp_path / "hf_home")}
    done = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["lmforge"]["sample_len"] == 4
    for metric in ("acc,none", "acc_norm,none"):
        assert results["lmforge"][metric] == results["hf"][metric]
