"""Every `lmforge` command, driven with random and boundary values: no traceback, exit code 0 or 2,
nothing written outside the folder the command was run in.

The command tree is walked from the Typer app, so a new command or option is covered without
editing this file. Each command runs in-process through `lmforge.cli.run` (the `lmforge` entry
point) with its cwd in a fresh temp folder holding a few awkward files: empty, non-UTF-8, a folder.
Commands that would run for minutes with valid settings (train, speedrun, serve, scaling sweep,
data clean) get one setting that must be refused, so only their validation path runs.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import typer
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.cli import app, run
from lmforge.model import ModelConfig, Transformer, save
from lmforge.tokenizer import train_tokenizer

ROOT = typer.main.get_command(app)
REPO = Path(__file__).resolve().parents[1]


def walk(group, prefix: tuple[str, ...] = ()):
    if hasattr(group, "commands"):
        for name, sub in sorted(group.commands.items()):
            yield from walk(sub, prefix + (name,))
    else:
        yield prefix, group


COMMANDS = dict(walk(ROOT))

# Settings that must be refused, so the long-running commands stop after validating their input.
VALIDATION_ONLY = {
    ("train",): ["train.max_steps=-1"],
    ("safety", "dp-train"): ["train.max_steps=-1"],
    ("safety", "unlearn"): ["train.max_steps=-1"],
    ("finetune", "sft"): ["train.max_steps=-1"],
    ("finetune", "dpo"): ["train.max_steps=-1"],
    ("finetune", "rm"): ["train.max_steps=-1"],
    ("finetune", "grpo"): ["train.max_steps=-1"],
    ("finetune", "ppo"): ["train.max_steps=-1"],
    ("speedrun",): ["train.max_steps=-1"],
    ("serve",): ["--device", "tpu"],
    ("scaling", "sweep"): ["--dims", "x"],
    ("data", "clean"): ["--workers", "0"],
    ("safety", "guard-eval"): ["--fpr", "-1"],
}
# Appended to every drawn command line: importing Presidio (it loads spaCy) costs a minute per
# example; `pii-bench --presidio` is tested in tests/data/test_pii_real.py.
ALWAYS = {("data", "pii-bench"): ["--no-presidio"],
          # the default guard classifier trains for ~10 s; the rules alone exercise the same paths
          ("safety", "guard"): ["--classifier", "rules"], ("safety", "redteam"): ["--classifier", "rules"]}
# Commands whose default input is large (the bundled 135M-parameter model, the whole stdlib corpus)
# always get a drawn one: the tiny model in the workspace, or a path that is wrong in some way.
HEAVY_DEFAULT = {("safety", "interp"), ("safety", "unlearn"), ("finetune", "sft"), ("finetune", "dpo"), ("finetune", "rm"), ("finetune", "grpo"), ("finetune", "ppo"), ("generate",), ("chat",), ("int8-report",),
                 ("eval",), ("tokenizer", "train"), ("safety", "redteam"), ("quantize",), ("export", "gguf"),
                 ("medusa-train",)}
# Loop counts bounded so that a valid value finishes in a moment (the value itself is not the bug).
CAPS = {"steps": 20, "num_prompts": 4, "bootstrap": 20, "docs": 30, "max_tokens": 8, "max_chars": 3000, "limit": 3, "per_family": 2, "benign_n": 3}
PATHS = ["", "missing", "missing/deeper/x", "file.txt", "empty.txt", "latin1.txt", "folder", "ü🙂 name",
         "model", "tok", "file.txt/child"]
TEXT = ["", " ", "x", "ü🙂", "a.b=1", "=", "key=", "bpb", "bpb:file.txt", "mc:missing", "needle", "humaneval,bpb",
        "fp16", "auto", "cpu", "cuda", "hf", "lmforge", "1b", "tiny", "7B", "-1", "nan", "inf", "1e400", "h100"]
INTS = [-(2**63), -1, 0, 1, 2, 3, 16, 300, 2**31, 2**63]
FLOATS = [math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 1e-300, 0.5, 1.0, 2.0, 1e308]


def is_argument(param) -> bool:
    return type(param).__name__ == "TyperArgument"


def value_strategy(param):
    """Boundary values, random ones, and the option's own default (so that the other drawn
    values also get to run past validation)."""
    kind = param.type_descriptor.annotation
    default = param.default
    usual = [st.just(str(default))] if isinstance(default, (int, float, str)) and default != "" else []
    if kind is int:
        ints = st.sampled_from(INTS) | st.integers(-3, 400)
        cap = CAPS.get(param.name)
        return st.one_of(*usual, ints.map(lambda v: str(min(v, cap)) if cap else str(v)))  # negatives stay
    if kind is float:
        return st.one_of(*usual, (st.sampled_from(FLOATS) | st.floats(-10, 10)).map(repr))
    if param.nargs > 1:
        return st.tuples(*[st.sampled_from(TEXT) for _ in range(param.nargs)])
    return st.one_of(*usual, st.sampled_from(PATHS + TEXT), st.text(max_size=8))


def flag_of(option) -> str:
    return max(option.opts, key=len)


@st.composite
def command_line(draw, path: tuple[str, ...], command) -> list[str]:
    args: list[str] = list(path)
    for param in command.params:
        if param.name == "help":
            continue
        if is_argument(param):
            given = st.sampled_from(["model", "file.txt", "missing", "folder", "empty.txt", "latin1.txt"])
            if param.nargs == -1:
                other = st.sampled_from(PATHS + TEXT) | st.text(max_size=6)
                args += draw(st.lists(st.one_of(given, given, other), min_size=path in HEAVY_DEFAULT, max_size=2))
            elif param.required or path in HEAVY_DEFAULT or draw(st.booleans()):
                args.append(str(draw(given | st.sampled_from(PATHS + TEXT))))
            continue
        if not (param.required or draw(st.booleans())):
            continue
        if param.is_flag:
            secondary = getattr(param, "secondary_opts", [])
            args.append(draw(st.sampled_from(param.opts + secondary)))
            continue
        for _ in range(draw(st.integers(1, 2)) if param.multiple else 1):
            value = draw(value_strategy(param))
            args += [flag_of(param), *(map(str, value) if isinstance(value, tuple) else [str(value)])]
    if path in (("generate",), ("chat",), ("int8-report",), ("eval",)) and draw(st.booleans()):
        args += ["--device", "cpu"]   # mostly the tiny model on CPU; sometimes an "auto" device
    return args + VALIDATION_ONLY.get(path, []) + ALWAYS.get(path, [])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with the inputs the drawn paths name (copied afresh for each example)."""
    base = tmp_path_factory.mktemp("cli")
    (base / "file.txt").write_text("def add(a, b):\n    return a + b\n" * 20)
    (base / "empty.txt").write_text("")
    (base / "latin1.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1") * 10)
    (base / "folder").mkdir()
    tok = train_tokenizer(["def add(a, b):\n    return a + b\n" * 10], vocab_size=300, min_frequency=1)
    tok.save(base / "tok")
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32,
                      max_seq_len=32)
    save(Transformer(cfg), base / "model")
    tok.save(base / "model")
    return base


def snapshot(folder: Path) -> dict[str, int]:
    if not folder.exists():
        return {}
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")} | {str(folder): folder.stat().st_mtime_ns}


def run_in(folder: Path, args: list[str]) -> tuple[int, str]:
    before = os.getcwd()
    os.chdir(folder)
    try:
        with CliRunner().isolation(input="") as (out, err, _):
            code = run(args)
            return code, out.getvalue().decode(errors="replace") + err.getvalue().decode(errors="replace")
    finally:
        os.chdir(before)


@pytest.mark.slow
@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_command_survives_random_and_boundary_values(path, workspace, tmp_path_factory):
    import shutil

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sentinel = tmp_path_factory.mktemp("sentinel")
    (sentinel / "keep.txt").write_text("untouched")
    watched = [sentinel, REPO / "runs", REPO / "src"]

    @settings(max_examples=10, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(args=command_line(path, COMMANDS[path]))
    def check(args):
        work = Path(tmp_path_factory.mktemp("work"))
        shutil.copytree(workspace, work, dirs_exist_ok=True)
        outside = {str(w): snapshot(w) for w in watched}
        code, output = run_in(work, args)
        assert "Traceback" not in output, (args, output)
        assert code in (0, 2), (args, code, output)
        if path in VALIDATION_ONLY:
            assert code == 2, (args, output)   # the long-running commands must stop at validation
        assert {str(w): snapshot(w) for w in watched} == outside, args

    try:
        check()
    finally:
        torch.set_num_threads(threads)


def test_short_flags_mean_one_thing_everywhere():
    """`-t` is the tokenizer in every command that has it, never the task list, and so on."""
    meaning: dict[str, set[str]] = {}
    for command in COMMANDS.values():
        for param in command.params:
            for opt in getattr(param, "opts", []) + getattr(param, "secondary_opts", []):
                if re.fullmatch(r"-[A-Za-z]", opt):
                    meaning.setdefault(opt, set()).add(param.name)
    assert meaning, "no short flags found: the walk over the command tree is broken"
    assert {flag: names for flag, names in meaning.items() if len(names) > 1} == {}
    assert meaning["-t"] == {"tokenizer"} and meaning["-o"] == {"out"}


MODEL_COMMANDS = [("generate",), ("serve",), ("chat",), ("int8-report",), ("eval",), ("medusa-train",)]


@pytest.mark.parametrize("path", MODEL_COMMANDS, ids=" ".join)
def test_model_commands_share_one_grammar(path):
    """A positional MODEL (with -m/--model as a hidden alias), -t/--tokenizer, and --dtype/--device
    defaulting to auto, in every command that loads a model."""
    params = {p.name: p for p in COMMANDS[path].params}
    positional = [p for p in params.values() if is_argument(p)]
    assert positional and positional[0].name in ("model", "args")
    assert params["model_opt"].hidden and set(params["model_opt"].opts) == {"--model", "-m"}
    assert set(params["tokenizer"].opts) == {"--tokenizer", "-t"}
    assert params["dtype"].default == "auto" and params["device"].default == "auto"


# Arguments that make each command valid and quick, so one option at a time can be pushed to its edge.
VALID_BASE = {
    ("tokenizer", "train"): ["file.txt"], ("tokenizer", "encode"): ["-t", "tok", "hello"],
    ("generate",): ["model", "-p", "hi", "--device", "cpu"], ("chat",): ["model", "--device", "cpu"],
    ("int8-report",): ["model", "--text-file", "file.txt", "--device", "cpu"],
    ("eval",): ["model", "--tasks", "bpb:file.txt", "--device", "cpu"],
    ("data", "shards"): ["file.txt", "-t", "tok"], ("data", "report"): ["folder"],
    ("scaling", "fit"): ["runs.csv"], ("plan", "params"): ["tiny"], ("plan", "memory"): ["tiny"],
    ("plan", "inference"): ["tiny"], ("plan", "time"): ["--params", "7B", "--tokens", "1T"],
    ("plan", "optimal"): ["1e20"], ("convert",): ["model", "converted"],
    ("safety", "guard"): ["hello", "--classifier", "rules"],
    ("safety", "redteam"): ["model", "--per-family", "1", "--benign", "1", "--max-tokens", "2", "--classifier", "rules"],
    ("quantize",): ["model", "--method", "rtn", "--group-size", "32", "-o", "quantized"],
    ("export", "gguf"): ["model", "-o", "model.gguf"],
    ("medusa-train",): ["model", "-o", "heads", "--num-prompts", "2", "--max-tokens", "4", "--steps", "3",
                        "--device", "cpu"],
}
EDGES = {int: ["-1", "0", str(2**63)], float: ["nan", "inf", "-1e308"]}
NUMERIC = [(path, param.name, flag_of(param), value)
           for path, command in COMMANDS.items() for param in command.params
           if not is_argument(param) and param.type_descriptor.annotation in EDGES
           for value in EDGES[param.type_descriptor.annotation]
           if not (value == str(2**63) and param.name in CAPS)]   # huge loop counts only take long


@pytest.mark.slow
@pytest.mark.parametrize("path, name, flag, value", NUMERIC, ids=lambda x: " ".join(x) if isinstance(x, tuple) else x)
def test_each_numeric_option_at_its_edges(path, name, flag, value, workspace, tmp_path):
    """Negative, zero and huge ints, nan/inf floats, one option at a time on an otherwise valid line."""
    import shutil

    shutil.copytree(workspace, tmp_path, dirs_exist_ok=True)
    (tmp_path / "runs.csv").write_text("N,D,loss\n" + "".join(
        f"{n},{d},{1.7 + 400 / n ** 0.34 + 410 / d ** 0.28:.5f}\n" for n in (1e6, 4e6, 1.6e7) for d in (1e8, 4e8, 1.6e9)))
    args = [*path, *VALID_BASE.get(path, []), flag, value, *VALIDATION_ONLY.get(path, [])]
    code, output = run_in(tmp_path, args)
    assert "Traceback" not in output and code in (0, 2), (args, code, output)
