"""Prompt log-probs (`echo=true` + `logprobs` on /v1/completions) equal transformers' on the same
weights; `lmforge eval --endpoint` and lm-eval's `local-completions` score multiple-choice
tasks against `lmforge serve` and agree with in-process scoring."""
import json
import os
import subprocess
import sys

import httpx
import pytest
import torch

from lmforge.serve import EngineConfig
from tests.eval.conftest import DATA, make_tiny_hf_model
from tests.serve.helpers import RunningServer

transformers = pytest.importorskip("transformers")

TEXTS = ["Question: What is 2 + 2?\nAnswer: 4", "The quick brown fox jumps over the lazy dog.",
         "A. red\nB. blue\nAnswer: B"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("echo") / "model")


@pytest.fixture(scope="module")
def tiny_served(tiny_dir):
    from lmforge.model import load
    from lmforge.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_dir)
    with RunningServer(load(tiny_dir), tok, "tiny", EngineConfig(kv_cache_mb=16)) as server:
        server.tok = tok
        yield server


def _reference(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def _check_against(ref: torch.Tensor, ids: list[int], lp: dict, k: int, tol: float) -> None:
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["token_logprobs"]) == len(ids)
    for t in range(1, len(ids)):
        assert lp["token_logprobs"][t] == pytest.approx(float(ref[t - 1, ids[t]]), abs=tol)
        top = sorted(ref[t - 1].tolist(), reverse=True)[:k]
        got = lp["top_logprobs"][t]  # keyed by token text: tokens that decode alike share one key
        assert 1 <= len(got) <= k and max(got.values()) == pytest.approx(top[0], abs=tol)
        assert all(min(abs(v - r) for r in top) <= tol for v in got.values())


def test_prompt_logprobs_equal_transformers(tiny_served, tiny_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    tok = tiny_served.tok
    for text in TEXTS:
        ids = tok.encode_text(text)
        ref = _reference(hf, ids)
        for prompt in (text, ids):  # a text prompt and the same prompt as token ids
            r = httpx.post(tiny_served.url + "/v1/completions", json={
                "model": "tiny", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2}).json()
            choice = r["choices"][0]
            assert choice["text"] == text and r["usage"] == {**r["usage"], "prompt_tokens": len(ids),
                                                              "completion_tokens": 0}
            _check_against(ref, ids, choice["logprobs"], 2, 1e-4)
            assert [text[o:] for o in choice["logprobs"]["text_offset"]] == [tok.decode(ids[i:]) for i in range(len(ids))]


def test_echo_then_generate_streams_the_same(tiny_served):
    body = {"model": "tiny", "prompt": TEXTS[1], "max_tokens": 5, "echo": True, "logprobs": 1, "temperature": 0}
    full = httpx.post(tiny_served.url + "/v1/completions", json=body).json()["choices"][0]
    n = len(tiny_served.tok.encode_text(TEXTS[1]))
    lp = full["logprobs"]
    assert len(lp["tokens"]) == n + 5 and full["text"].startswith(TEXTS[1])
    assert lp["text_offset"][n] == len(TEXTS[1])                      # generated tokens continue the offsets
    assert "".join(lp["tokens"][n:]) == full["text"][len(TEXTS[1]):]
    with httpx.stream("POST", tiny_served.url + "/v1/completions", json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    parts = [e["choices"][0] for e in events]
    assert "".join(p["text"] for p in parts) == full["text"]
    assert sum((p["logprobs"]["token_logprobs"] for p in parts if p["logprobs"]), []) == lp["token_logprobs"]


def test_max_tokens_zero_needs_echo(tiny_served):
    r = httpx.post(tiny_served.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 0})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]


def test_lmforge_eval_endpoint_scores_multiple_choice_against_lmforge_serve(tiny_served, tiny_dir):
    from lmforge.eval.endpoint_backend import EndpointBackend
    from lmforge.eval.local_backend import LocalBackend
    from lmforge.eval.runner import evaluate
    from lmforge.eval.tasks import make_task

    local = LocalBackend.from_ref(str(tiny_dir), device="cpu")
    remote = EndpointBackend(tiny_served.url)
    pairs = [("Question: What is 2 + 2?\nAnswer:", " 4"), ("A. red\nB. blue\nAnswer: ", "B")]
    for (lp, greedy), (ref, ref_greedy) in zip(remote.loglikelihood(pairs), local.loglikelihood(pairs)):
        assert lp == pytest.approx(ref, abs=1e-4) and greedy == ref_greedy
    task = f"arc:{DATA / 'arc_style.jsonl'}"
    served = evaluate(remote, [make_task(task)], None, None, show_progress=False)["tasks"]["arc"]
    here = evaluate(local, [make_task(task)], None, None, show_progress=False)["tasks"]["arc"]
    assert served["metrics"] == here["metrics"] and served["n"] == here["n"] > 0


@pytest.mark.slow
def test_lm_eval_local_completions_runs_against_lmforge_serve(tiny_served, tiny_dir, tmp_path):
    """lm-eval's own `local-completions` model, unmodified, scores a multiple-choice task through
    our server and gets the accuracies of lm-eval's HF backend on the same weights."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    (tmp_path / "toy.yaml").write_text((DATA / "lm_eval_task" / "toy.yaml").read_text().replace(
        "DATA_FILE", str(DATA / "lm_eval_toy.jsonl")))
    script = (
        "import json, sys\nimport lm_eval\nfrom lm_eval.tasks import TaskManager\n"
        "tm = TaskManager(include_path=sys.argv[2])\nout = {}\n"
        "args = {'local-completions': f'model=tiny,base_url={sys.argv[3]}/v1/completions,tokenizer={sys.argv[1]},"
        "tokenizer_backend=huggingface,num_concurrent=2,max_retries=1',\n"
        "        'hf': 'pretrained=' + sys.argv[1]}\n"
        "for m, a in args.items():\n"
        "    r = lm_eval.simple_evaluate(model=m, model_args=a, tasks=['lmforge_toy_mc'], task_manager=tm,\n"
        "                                device='cpu', batch_size=1)\n"
        "    out[m] = r['results']['lmforge_toy_mc']\nprint(json.dumps(out))\n")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "unused",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"), "HF_HOME": str(tmp_path / "hf_home")}
    done = subprocess.run([sys.executable, "-c", script, str(tiny_dir), str(tmp_path), tiny_served.url], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["local-completions"]["sample_len"] == 4
    for metric in ("acc,none", "acc_norm,none"):
        assert results["local-completions"][metric] == results["hf"][metric]


@pytest.mark.slow
def test_smollm2_prompt_logprobs_equal_transformers(smollm_path, smollm, smollm_tokenizer):
    tok = smollm_tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name,
                                                           dtype=torch.float32).eval()
    with RunningServer(smollm, tok, "smollm2", EngineConfig(kv_cache_mb=16)) as server:
        for text in TEXTS[:1]:
            ids = tok.encode_text(text)
            r = httpx.post(server.url + "/v1/completions", json={
                "model": "smollm2", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 3}).json()
            _check_against(_reference(hf, ids), ids, r["choices"][0]["logprobs"], 3, 1e-4)
