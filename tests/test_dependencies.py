"""Every third-party module that src/ imports is declared in pyproject.toml.

Read with `ast`, nothing imported. An import at module level (outside a try that catches the
ImportError) runs whenever its module is imported, so its distribution must be a runtime
dependency. An import inside a function or guarded by `except ImportError` serves an optional
feature: its distribution must be a runtime dependency or in a feature extra (not only `dev`,
which is for lmforge's own tests, not for users).
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# Import names that differ from their distribution's name (after normalising - and _).
DISTRIBUTION_OF = {
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "PIL": "pillow",
}
GUARD_EXCEPTIONS = {"ImportError", "ModuleNotFoundError", "Exception"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution(top_level: str) -> str:
    return normalise(DISTRIBUTION_OF.get(top_level, top_level))


def requirement_name(spec: str) -> str:
    return normalise(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1))


def declared(pyproject: Path = ROOT / "pyproject.toml") -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    runtime = {requirement_name(s) for s in project.get("dependencies", [])}
    extras = {extra: {requirement_name(s) for s in specs}
              for extra, specs in project.get("optional-dependencies", {}).items()}
    return runtime, extras


def _guarded(node: ast.AST, parents: dict) -> tuple[bool, bool]:
    """(inside a function, inside a try that catches ImportError) for an import node."""
    in_function = in_guard = False
    child, node = node, parents.get(node)
    while node is not None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function = True
        if isinstance(node, ast.Try) and child in node.body:
            caught = set()
            for handler in node.handlers:
                types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                caught |= {t.id for t in types if isinstance(t, ast.Name)}
            in_guard |= bool(caught & GUARD_EXCEPTIONS)
        if isinstance(node, ast.If) and child in node.body and "TYPE_CHECKING" in ast.unparse(node.test):
            in_guard = True  # never runs
        child, node = node, parents.get(node)
    return in_function, in_guard


def third_party_imports(src: Path = SRC) -> list[tuple[str, str, bool]]:
    """(top-level module, 'file:line', optional) for every third-party import in src."""
    found = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        siblings = {p.stem for p in path.parent.glob("*.py")}  # a script importing files next to it
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in {"lmforge", "__future__"} or top in siblings:
                    continue
                in_function, in_guard = _guarded(node, parents)
                found.append((top, f"{path.relative_to(src)}:{node.lineno}", in_function or in_guard))
    return found


def undeclared(imports, runtime: set[str], extras: dict[str, set[str]]) -> list[str]:
    features = set().union(*(deps for extra, deps in extras.items() if extra != "dev"))
    problems = []
    for top, where, optional in imports:
        dist = distribution(top)
        if dist in runtime or (optional and dist in features):
            continue
        need = "a runtime dependency or a feature extra" if optional else "a runtime dependency"
        problems.append(f"{where}: imports {top} (distribution {dist}), which must be {need}")
    return problems


def test_every_imported_distribution_is_declared():
    problems = undeclared(third_party_imports(), *declared())
    assert not problems, "declare these in pyproject.toml:\n" + "\n".join(problems)


def test_the_scan_sees_top_level_lazy_and_guarded_imports():
    imports = {(top, optional) for top, _, optional in third_party_imports()}
    assert ("jinja2", False) in imports                # tokenizer/chat.py, module level
    assert ("uvicorn", True) in imports                # serve/cli.py, inside a function
    assert ("sentence_transformers", True) in imports  # data/mixing.py, try/except ImportError
    assert not {top for top, _ in imports} & {"lmforge", "os", "sandbox_linux"}  # ours, stdlib, sibling script


def test_an_undeclared_or_dev_only_import_is_reported(tmp_path):
    pkg = tmp_path / "lmforge"
    pkg.mkdir()
    (pkg / "a.py").write_text("import yaml\nimport httpx\n\ndef f():\n    import transformers\n"
                              "try:\n    import ray\nexcept ImportError:\n    ray = None\n")
    imports = third_party_imports(tmp_path)
    runtime, extras = {"pyyaml"}, {"dev": {"transformers", "httpx"}, "ray": {"ray"}}
    assert undeclared(imports, runtime, extras) == [
        "lmforge/a.py:2: imports httpx (distribution httpx), which must be a runtime dependency",
        "lmforge/a.py:5: imports transformers (distribution transformers), which must be a runtime "
        "dependency or a feature extra"]


def test_the_name_map_agrees_with_installed_metadata():
    """Where a mapped module is installed, its metadata names the mapped distribution."""
    installed = importlib.metadata.packages_distributions()
    checked = 0
    for top in {top for top, _, _ in third_party_imports()}:
        if top in installed:
            assert distribution(top) in {normalise(d) for d in installed[top]}, top
            checked += 1
    assert checked >= 10  # most of what src imports is installed in the test environment
