"""The output-folder rule (lmforge.outputs) through the writers that use it: refusals, what
survives an overwrite, the user's umask, and atomicity when a write dies half-way."""
import json
import os
import stat
import subprocess
import sys

import pytest

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer, load, save, save_hf
from lmforge.outputs import MARKER, atomic_write_text, check_destination, output_kind

TINY = ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, max_seq_len=32)


def tiny_model(seed=0):
    import torch
    torch.manual_seed(seed)
    return Transformer(TINY)


def test_refuses_a_users_non_empty_folder_and_keeps_it(tmp_path):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "thesis.tex").write_text("years of work")
    for writer in (save, save_hf):
        with pytest.raises(LmforgeError, match="not an lmforge output.*--overwrite"):
            writer(tiny_model(), dst)
    assert [p.name for p in dst.iterdir()] == ["thesis.tex"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_refuses_a_file_as_destination(tmp_path):
    dst = tmp_path / "model"
    dst.write_text("not a folder")
    with pytest.raises(LmforgeError, match="is a file"):
        save(tiny_model(), dst, overwrite=True)
    assert dst.read_text() == "not a folder"


def test_overwrite_writes_into_a_users_folder_and_keeps_their_files(tmp_path):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    save_hf(tiny_model(), dst, overwrite=True)
    assert (dst / "notes.txt").read_text() == "keep me"
    assert load(dst).cfg == TINY


def test_rewriting_an_output_replaces_only_what_lmforge_wrote(tmp_path):
    dst = tmp_path / "out"
    save_hf(tiny_model(0), dst, max_shard_bytes=4000)  # sharded: several model-*.safetensors
    assert len(list(dst.glob("model-*.safetensors"))) > 1
    (dst / "README.md").write_text("my notes")
    save_hf(tiny_model(1), dst)  # an lmforge output: no --overwrite needed
    names = sorted(p.name for p in dst.iterdir())
    assert names == [MARKER, "README.md", "config.json", "model.safetensors"]  # old shards gone, README kept
    import torch
    assert torch.equal(load(dst).embed_tokens.weight, tiny_model(1).embed_tokens.weight)


def test_a_downloaded_hf_folder_counts_as_an_output(tmp_path):
    dst = tmp_path / "hf"
    save_hf(tiny_model(), dst)
    (dst / MARKER).unlink()  # as if written by another tool
    assert output_kind(dst) == "hf-model"
    check_destination(dst, "model")  # replaced without --overwrite ...
    with pytest.raises(LmforgeError, match="holds an lmforge hf-model output"):
        check_destination(dst, "clean")  # ... but not by another kind of output


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_and_folders_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_hf(tiny_model(), tmp_path / "m")
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o777 & ~umask
    for f in [tmp_path / "f.txt", *(tmp_path / "m").iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


CRASH = """
import os, sys, torch
import lmforge.model.io as io
from lmforge.model import ModelConfig, Transformer
cfg = ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, max_seq_len=32)
real = io.write_safetensors_dir
def dying(state, path, *a):
    real(state, path, *a)
    os.kill(os.getpid(), 9)  # a real SIGKILL after the weights are written, before the commit
io.write_safetensors_dir = dying
torch.manual_seed(1)
io.save_hf(Transformer(cfg), sys.argv[1])
"""


def test_a_process_killed_mid_write_leaves_the_old_output(tmp_path):
    dst = tmp_path / "out"
    save_hf(tiny_model(0), dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    proc = subprocess.run([sys.executable, "-c", CRASH, str(dst)], env={**os.environ}, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    save_hf(tiny_model(1), dst)  # and the next run still works (the leftover temp folder is hidden)
    assert json.loads((dst / MARKER).read_text())["kind"] == "model"


def test_tokenizer_save_follows_the_rule(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from lmforge.tokenizer import Tokenizer, load_tokenizer
    tok = Tokenizer(HFTokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a")))
    dst = tmp_path / "tok"
    dst.mkdir()
    (dst / "data.txt").write_text("mine")
    with pytest.raises(LmforgeError, match="not an lmforge output"):
        tok.save(dst)
    tok.save(tmp_path / "fresh")
    tok.save(tmp_path / "fresh")  # its own output: replaced
    assert load_tokenizer(tmp_path / "fresh").eos_id == 1


def test_clean_output_inside_its_input_folder_is_not_read_back(tmp_path):
    from typer.testing import CliRunner

    from lmforge.cli import app
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        (src / f"doc{i}.txt").write_text(f"Document number {i} talks about topic {i * 7} at some length. " * 5)
    args = ["data", "clean", str(src), "--out", str(src / "clean"), "--workers", "1", "--no-progress",
            "decontam.enabled=false", "quality.enabled=false"]
    reports = []
    for _ in range(2):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        reports.append(json.loads((src / "clean" / "report.json").read_text()))
    assert [rep["documents_in"] for rep in reports] == [6, 6]  # not 6 then 6 + the output's own files
    assert reports[1]["read"]["files"] == 6


def test_clean_refuses_a_users_folder(tmp_path):
    from lmforge.corpus.document import Document
    from lmforge.data.pipeline import clean_corpus
    out = tmp_path / "docs"
    out.mkdir()
    (out / "letter.md").write_text("dear ...")
    with pytest.raises(LmforgeError, match="not an lmforge output"):
        clean_corpus([Document(id="a", text="some text " * 20)], out)
    assert [p.name for p in out.iterdir()] == ["letter.md"]


def test_a_trained_model_folder_carries_its_tokenizer(tmp_path):
    from typer.testing import CliRunner

    from lmforge.cli import app
    from lmforge.config import load_recipe
    from lmforge.corpus.document import Document
    from lmforge.data.token_shards import write_token_shards
    from lmforge.tokenizer import load_tokenizer, train_tokenizer
    from lmforge.train.config import TrainRecipe
    from lmforge.train.trainer import train
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(200)]
    tok = train_tokenizer(texts, kind="byte-bpe", vocab_size=300)
    docs = [Document(id=str(i), text=t) for i, t in enumerate(texts)]
    write_token_shards(docs, tok, tmp_path / "shards", val_fraction=0.2)
    recipe = load_recipe(TrainRecipe, None, [
        "model.preset=tiny", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
        "model.hidden_dim=64", "model.max_seq_len=32", f"train.data={tmp_path / 'shards'}",
        f"train.out={tmp_path / 'run'}", "train.seq_len=16", "train.micro_batch=2", "train.global_batch_tokens=32",
        "train.max_steps=2", "train.tensorboard=false"])
    train(recipe)
    model_dir = tmp_path / "run" / "model"
    assert load_tokenizer(model_dir).encode("def f(x):") == tok.encode("def f(x):")
    r = CliRunner().invoke(app, ["generate", "-m", str(model_dir), "-p", "def", "--max-tokens", "3", "--seed", "0"])
    assert r.exit_code == 0, r.output  # no --tokenizer needed


def test_train_refuses_a_users_folder(tmp_path, toy_shards):
    from lmforge.config import load_recipe
    from lmforge.train.config import TrainRecipe
    from lmforge.train.trainer import train
    out = tmp_path / "home"
    out.mkdir()
    (out / "todo.txt").write_text("x")
    recipe = load_recipe(TrainRecipe, None, ["model.preset=tiny", "model.dim=32", "model.n_layers=1",
                                             "model.n_heads=2", "model.n_kv_heads=1", "model.hidden_dim=64",
                                             f"train.data={toy_shards}", f"train.out={out}", "train.seq_len=16",
                                             "train.micro_batch=2", "train.global_batch_tokens=32",
                                             "train.max_steps=1", "train.tensorboard=false"])
    with pytest.raises(LmforgeError, match="not an lmforge output"):
        train(recipe)
    assert [p.name for p in out.iterdir()] == ["todo.txt"]


def test_outputs_written_before_the_marker_existed_are_recognised(tmp_path):
    run = tmp_path / "runs" / "speedrun"
    for sub in ("clean/work", "tokenizer", "train/ckpt"):
        (run / sub).mkdir(parents=True)
    (run / "report.json").write_text("{}")
    (run / "clean" / "report.json").write_text("{}")
    (run / "clean" / "work" / "manifest.json").write_text("{}")
    (run / "tokenizer" / "lmforge_tokenizer.json").write_text("{}")
    (run / "train" / "recipe.yaml").write_text("")
    (run / "train" / "metrics.jsonl").write_text("")
    kinds = {p: output_kind(run / p) for p in ("", "clean", "tokenizer", "train")}
    assert kinds == {"": "speedrun", "clean": "clean", "tokenizer": "tokenizer", "train": "train"}
    assert output_kind(tmp_path) is None


def test_a_tokenizer_saved_into_a_model_folder_is_added_to_it(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from lmforge.tokenizer import Tokenizer, load_tokenizer
    save_hf(tiny_model(), tmp_path / "m")
    Tokenizer(HFTokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a"))).save(tmp_path / "m")
    assert load(tmp_path / "m").cfg == TINY and load_tokenizer(tmp_path / "m").eos_id == 1
    assert "tokenizer.json" in json.loads((tmp_path / "m" / MARKER).read_text())["files"]


@pytest.mark.parametrize("command", [
    ["eval", "no-such-model", "--tasks", "bpb"],
    ["data", "clean", "stdlib"],
    ["tokenizer", "train"],
])
def test_every_output_folder_command_refuses_a_users_folder_before_working(tmp_path, command):
    """The refusal comes first (no model load, no corpus read) and names --overwrite; nothing is touched."""
    from lmforge.cli import run
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert run([*command, "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
