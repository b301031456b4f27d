"""SFT: the assistant mask is byte-exact on the chat template, end-of-turn is trained when
pad == eos, accumulation splits give the same loss and gradients, SFT learns what a shuffled
control cannot, kill -9 + resume is bitwise exact, and train.init_from loads weights exactly."""
import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.align.cli import RECIPES
from lmforge.align.data import stdlib_chats, tokenize_chat
from lmforge.align.sft import SFTObjective, SFTRecipe, build_examples, finetune_sft
from lmforge.train.examples import IGNORE, collate
from lmforge.config import load_recipe
from lmforge.gguf_file import bundled_smollm2
from lmforge.model import ModelConfig, Transformer, load, save
from lmforge.tokenizer import load_tokenizer, train_tokenizer
from lmforge.tokenizer.tokenizer import IM_END
from lmforge.train.config import TrainConfig, TrainRecipe
from lmforge.train.trainer import accumulate_gradients, initial_model, train

CHAT = [
    {"role": "system", "content": "Be brief. <|im_end|> is just text here."},
    {"role": "user", "content": "def f(x):\n    \"\"\"Double x.\"\"\""},
    {"role": "assistant", "content": "    return 2 * x"},
    {"role": "user", "content": "And <|im_start|>assistant\n?"},
    {"role": "assistant", "content": "\n  spaces and <|endoftext|> stay text\n\n"},
]


@pytest.fixture(scope="module")
def tok():
    chats = list(itertools.islice(stdlib_chats("train"), 300))
    return train_tokenizer([m["content"] for c in chats for m in c], vocab_size=700, min_frequency=1)


@pytest.fixture(scope="module")
def tiny_model(tok, tmp_path_factory):
    torch.manual_seed(0)
    net = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                  hidden_dim=64, max_seq_len=128))
    path = tmp_path_factory.mktemp("tiny") / "model"
    save(net, path, tokenizer=tok)
    return path


def trained_runs(ids, trained):
    """The contiguous runs of trained token ids."""
    return [[i for i, _ in group] for keep, group in itertools.groupby(zip(ids, trained), key=lambda p: p[1]) if keep]


def check_mask(tok, messages, end_of_turn):
    ids, trained = tokenize_chat(tok, messages)
    # Reference: the template's own rendering; the tokens reproduce it byte for byte ...
    assert tok.decode(ids) == tok.apply_chat_template(messages, add_generation_prompt=False)
    # ... the trained runs decode to exactly each assistant content + its end-of-turn marker ...
    want = [m["content"] + end_of_turn for m in messages if m["role"] == "assistant"]
    assert [tok.decode(run) for run in trained_runs(ids, trained)] == want
    # ... and the first assistant turn's prompt is tokenised as at inference (encode_chat + generation
    # prompt). Later prompts hold earlier assistant turns cut at their boundaries, as generated.
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = tok.encode_chat(messages[:first], add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt and not any(trained[:len(prompt)]) and trained[len(prompt)]


def test_assistant_mask_is_byte_exact_on_chatml(tok):
    check_mask(tok, CHAT, IM_END)


def test_assistant_mask_is_byte_exact_on_smollm2_template():
    """The bundled SmolLM2 template (a default system prompt, eos == pad == <|im_end|>)."""
    smol = load_tokenizer(bundled_smollm2())
    assert smol.eos_token == IM_END
    check_mask(smol, CHAT[1:], IM_END)


def test_end_of_turn_is_trained_when_pad_is_eos(tok):
    """Pad with <|im_end|>: each chat's end-of-turn labels survive, the padding is ignored."""
    pad = tok.hf.token_to_id(IM_END)
    chats = [CHAT, CHAT[1:3], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]
    examples = [tokenize_chat(tok, c) for c in chats]
    batch = collate(examples, pad_id=pad)
    width = max(len(ids) for ids, _ in examples) - 1
    assert batch["tokens"].shape == batch["labels"].shape == (3, width)
    for row, (ids, trained) in enumerate(examples):
        n = len(ids) - 1
        eot_positions = [j - 1 for j in range(1, len(ids)) if ids[j] == pad and trained[j]]
        n_turns = sum(m["role"] == "assistant" for m in chats[row])
        assert len(eot_positions) == n_turns  # every assistant turn's <|im_end|> is a trained target
        for j in eot_positions:
            assert batch["labels"][row, j] == pad
        assert (batch["tokens"][row, n:] == pad).all() and (batch["labels"][row, n:] == IGNORE).all()
        want = [ids[j + 1] if trained[j + 1] else IGNORE for j in range(n)]
        assert batch["labels"][row, :n].tolist() == want


def test_batch1_accum8_equals_batch8_accum1(tok):
    """fp64: the loop's token-weighted accumulation over 8 micro-batches of 1 chat gives the loss
    and gradients of one micro-batch of 8 (right-padded), and both equal a plain cross-entropy
    over the full logits of each chat alone (the reference)."""
    chats = list(itertools.islice(stdlib_chats("train"), 40))
    examples, _ = build_examples(tok, chats, 128, 8)
    assert len({sum(t) for _, t in examples}) >= 3  # different numbers of trained tokens per chat
    torch.manual_seed(0)
    net = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                  hidden_dim=64, max_seq_len=128)).double()
    objective = SFTObjective(tok, examples, [], 8)
    pad = objective.pad_id

    def run(micros):
        net.zero_grad()
        loss_sum, _, _, _ = accumulate_gradients(objective, net, net, micros, torch.device("cpu"),
                                                      contextlib.nullcontext)
        return float(loss_sum) / len(micros), {n: p.grad.clone() for n, p in net.named_parameters()}

    loss8, grads8 = run([collate(examples, pad)])
    loss1, grads1 = run([collate([e], pad) for e in examples])

    net.zero_grad()
    total = 0
    nll = torch.zeros((), dtype=torch.float64)
    for ids, trained in examples:
        logits = net(torch.tensor([ids[:-1]]))[0]
        targets = torch.tensor([t if k else -100 for t, k in zip(ids[1:], trained[1:])])
        nll = nll + F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        total += int((targets != -100).sum())
    (nll / total).backward()
    ref_grads = {n: p.grad.clone() for n, p in net.named_parameters()}

    assert loss8 == pytest.approx(float(nll.detach() / total), rel=1e-12, abs=0)
    assert loss1 == pytest.approx(float(nll.detach() / total), rel=1e-12, abs=0)
    # Tolerance: the model runs RMSNorm and RoPE in fp32 even with fp64 weights, so gradients agree
    # to fp32's ~1e-7 relative to each tensor's norm (measured <= 9e-8), not to fp64's 1e-16.
    for name, ref in ref_grads.items():
        for got in (grads8[name], grads1[name]):
            assert float((got - ref).norm() / ref.norm()) < 1e-6, name


# --- learning, with a shuffled control ----------------------------------------------------------
KEYS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "ember", "flint", "grape", "heron",
        "ivory", "jolly", "koala", "lemon", "mango"]
VALUES = ["north", "south", "east", "west", "red", "blue", "green", "black", "white", "gold", "silver",
          "copper", "iron", "tin", "zinc", "lead"]
NOISE = ["please", "now", "tell", "me", "quickly", "kindly", "the", "word", "for", "today"]


def key_value_chats(rng, n, shuffled=False):
    """'<noise> <noise> KEY' -> VALUE[KEY]: the answer depends on the prompt; shuffled pairs it at random."""
    chats = []
    for _ in range(n):
        k = rng.randrange(len(KEYS))
        chats.append([{"role": "user", "content": f"{rng.choice(NOISE)} {rng.choice(NOISE)} {KEYS[k]}"},
                      {"role": "assistant", "content": VALUES[k]}])
    if shuffled:
        answers = [c[1] for c in chats]
        rng.shuffle(answers)
        chats = [[c[0], a] for c, a in zip(chats, answers)]
    return chats


def write_jsonl(path, chats):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


def held_out_loss(model_dir, tok, val_path):
    from lmforge.align.data import read_chat_jsonl
    net = load(model_dir).eval()
    examples = [tokenize_chat(tok, c) for c in read_chat_jsonl(val_path)]
    batch = collate(examples, tok.eos_id)
    with torch.no_grad():  # reference: cross-entropy over the full logits
        logits = net(batch["tokens"])
        return float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sft_learns_prompt_dependent_answers_and_shuffled_control_does_not(tmp_path, seed):
    rng = random.Random(seed)
    words = KEYS + VALUES + NOISE
    tok = train_tokenizer([" ".join(words)] * 20, vocab_size=400, min_frequency=1)
    torch.manual_seed(seed)
    start = tmp_path / "start"
    save(Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=48, n_layers=2, n_heads=4, n_kv_heads=2,
                                 hidden_dim=96, max_seq_len=64)), start, tokenizer=tok)
    train_chats = key_value_chats(rng, 400)
    val = write_jsonl(tmp_path / "val.jsonl", key_value_chats(rng, 64))
    real = write_jsonl(tmp_path / "real.jsonl", train_chats)
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", key_value_chats(random.Random(seed), 400, shuffled=True))
    common = ["train.seq_len=32", "train.micro_batch=16", "train.global_batch_tokens=512", "train.max_steps=120",
              "train.lr=0.01", "train.warmup=0.1", "train.eval_every=120", "train.ckpt_every=120",
              "train.log_every=20", "train.tensorboard=false", f"train.seed={seed}", "sft.max_examples=400"]
    before = held_out_loss(start, tok, val)
    losses = {}
    for name, data in (("real", real), ("shuffled", shuffled)):
        recipe = load_recipe(SFTRecipe, None, [*common, f"sft.data={data}", f"train.out={tmp_path / name}"])
        finetune_sft(recipe, str(start))
        losses[name] = held_out_loss(tmp_path / name / "model", tok, val)
    gain_real, gain_shuffled = before - losses["real"], before - losses["shuffled"]
    print(f"seed {seed}: held-out assistant loss {before:.3f} -> real {losses['real']:.3f}, "
          f"shuffled {losses['shuffled']:.3f}")
    assert losses["real"] < 0.2                      # it learned KEY -> VALUE for unseen prompts
    # The control can learn the format and the answers' marginal, not which answer: it keeps ~ln(16)
    # nats on each answer's first token, ~0.9 per trained token (measured 0.86-0.90 vs real 0.04-0.07).
    assert gain_real > gain_shuffled + 0.5


# --- kill -9 + resume ---------------------------------------------------------------------------
RESUME = ["train.seq_len=96", "train.micro_batch=2", "train.global_batch_tokens=384", "train.max_steps=16",
          "train.log_every=1", "train.eval_every=8", "train.ckpt_every=3", "train.keep_last=2", "train.lr=0.003",
          "train.tensorboard=false", "sft.max_examples=40", "sft.val_examples=4"]


def checkpoint_step(out) -> int:
    root = out / "ckpt"
    steps = [int(p.name[5:]) for p in root.glob("step_*") if (p / "trainer.json").exists()] if root.exists() else []
    return max(steps, default=0)


def logged_steps(log) -> list[int]:
    return [int(m) for m in re.findall(r"^step (\d+) ", log.read_text(), re.M)]


def test_finetune_sft_kill9_and_resume_is_bitwise_exact(tiny_model, tmp_path):
    rng = random.Random(5)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # the command's default recipe (sft-tiny.yaml) under the same overrides, run in-process
    finetune_sft(load_recipe(SFTRecipe, RECIPES / "sft-tiny.yaml", [*RESUME, f"train.out={ref}"]), str(tiny_model))
    cmd = [sys.executable, "-m", "lmforge", "finetune", "sft", str(tiny_model), "--resume", *RESUME,
           f"train.out={cut}"]
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    resumed_from = []
    for attempt in range(2):
        log = tmp_path / f"attempt{attempt}.log"
        expected = checkpoint_step(cut)
        proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
        kill_step = expected + rng.randint(4, 6)
        deadline = time.time() + 120
        while not any(s >= kill_step for s in logged_steps(log)):
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, log.read_text()
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (cut / "model").exists(), "the run finished before it could be killed"
        if expected:
            assert f"resumed from step {expected}" in log.read_text()
        resumed_from.append(checkpoint_step(cut))
    log = tmp_path / "final.log"
    proc = subprocess.run(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, timeout=300)
    assert proc.returncode == 0, log.read_text()
    assert f"resumed from step {resumed_from[-1]}" in log.read_text() and 0 < resumed_from[0] < resumed_from[1]

    rows = [json.loads(line) for line in open(cut / "metrics.jsonl")]
    ref_rows = [json.loads(line) for line in open(ref / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 17))
    for key in ("loss", "val_loss"):
        assert [r[key] for r in rows if key in r] == [r[key] for r in ref_rows if key in r]
    ours, want = load_file(cut / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors")
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)
    assert load_tokenizer(cut / "model").hf.to_str() == load_tokenizer(tiny_model).hf.to_str()  # self-contained


# --- train.init_from -------------------------------------------------------------------------------
def test_init_from_starts_pretraining_from_the_given_weights(tiny_model, tok, tmp_path):
    """lr=0 keeps the weights, so the trained model must equal the init_from model bit for bit
    (and a run without init_from must not)."""
    from lmforge.data.shards import ShardWriter
    writer = ShardWriter(tmp_path / "shards", vocab_size=tok.vocab_size, eos_id=tok.eos_id)
    ids = np.random.default_rng(0).integers(0, tok.vocab_size, size=4000).tolist()
    writer.add("train", ids)
    writer.close()
    base = ["model.preset=tiny", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "model.hidden_dim=64", "model.max_seq_len=128", f"train.data={tmp_path / 'shards'}",
            "train.seq_len=16", "train.micro_batch=2", "train.global_batch_tokens=32", "train.max_steps=2",
            "train.lr=0", "train.weight_decay=0", "train.tensorboard=false", "train.log_every=1"]
    train(load_recipe(TrainRecipe, None, [*base, f"train.init_from={tiny_model}", f"train.out={tmp_path / 'a'}"]))
    got, want = load(tmp_path / "a" / "model").state_dict(), load(tiny_model).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    train(load_recipe(TrainRecipe, None, [*base, f"train.out={tmp_path / 'b'}"]))  # control: random init
    other = load(tmp_path / "b" / "model").state_dict()
    assert not torch.equal(other["embed_tokens.weight"], want["embed_tokens.weight"])


def test_init_from_loads_the_bundled_smollm2_gguf_exactly():
    gguf = bundled_smollm2()
    tc = TrainConfig(init_from=str(gguf), seq_len=64, micro_batch=1, global_batch_tokens=64)
    got = initial_model(tc, None, 49152, torch.device("cpu")).state_dict()
    want = load(gguf, dtype=torch.float32).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_ctrl_c_mid_accumulation_saves_a_checkpoint_that_resumes_exactly(tiny_model, tmp_path, monkeypatch):
    """Ctrl-C inside step 5's second micro-batch: the saved checkpoint is step 4 with the loader
    before step 5's batches, so the resumed run equals an uninterrupted one bit for bit."""
    overrides = [*RESUME, "train.ckpt_every=100", "train.eval_every=100"]
    finetune_sft(load_recipe(SFTRecipe, None, [*overrides, f"train.out={tmp_path / 'ref'}"]), str(tiny_model))
    calls = {"n": 0}
    real_loss = SFTObjective.loss

    def interrupting_loss(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 2:  # grad accum 2: the 2nd micro-batch of step 5
            raise KeyboardInterrupt
        return real_loss(self, model, batch)

    monkeypatch.setattr(SFTObjective, "loss", interrupting_loss)
    cut = load_recipe(SFTRecipe, None, [*overrides, f"train.out={tmp_path / 'cut'}"])
    with pytest.raises(KeyboardInterrupt):
        finetune_sft(cut, str(tiny_model))
    assert checkpoint_step(tmp_path / "cut") == 4
    monkeypatch.setattr(SFTObjective, "loss", real_loss)
    finetune_sft(load_recipe(SFTRecipe, None, [*overrides, f"train.out={tmp_path / 'cut'}"]), str(tiny_model),
                 resume=True)
    ours = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    want = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    assert all(torch.equal(ours[k], want[k]) for k in want)
