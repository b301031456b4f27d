"""Imports go one way (DESIGN.md, "Rules of the house"): no cycle between files or between stage
packages, and every import across stages points down the layer table below. Lazy imports (inside
functions) count: they are cycles that merely wait for a caller. The graph is read with `ast`,
so nothing is imported to check it.

An import edge is any `import lmforge.x` / `from lmforge.x import y` / relative import anywhere in
a file, plus a string constant that names a module of the package exactly (the CLI registers the
stage CLIs with `importlib.import_module("lmforge.data.cli")`; `lmforge.eval` exports lazily by
module name).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The layer table of DESIGN.md: an import may point to a stage in the same layer or below,
# never above. Same-layer imports are allowed only while the stage graph stays acyclic.
LAYERS = {
    # shared low-level pieces
    "lmforge": 0, "errors": 0, "config": 0, "outputs": 0, "corpus": 0, "gguf_file": 0,
    "tokenizer": 1, "model": 1,
    "data": 2, "train": 2,
    "align": 3, "serve": 3, "quant": 3, "eval": 3, "safety": 3, "plan": 3,
    "speedrun": 4, "speedrun_page": 4, "speedrun_post": 4, "cli": 4, "__main__": 4,
}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str:
    """lmforge.data.readers -> data; lmforge.speedrun -> speedrun; lmforge -> lmforge."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imported(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against the importing file's package
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        # `from pkg import sub` imports the submodule when there is one, else a name from pkg
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
        return [node.value]
    return []


def import_graph(src: Path = SRC, package: str = "lmforge") -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in the file)."""
    files = {module_name(p, src): p for p in sorted((src / package).rglob("*.py"))}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            for target in _imported(node, module, path.name == "__init__.py", modules):
                if target in modules and target != module:
                    graph[module].add(target)
    return graph


def stage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    stages: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        stages[stage_of(module)].update(stage_of(t) for t in targets if stage_of(t) != stage_of(module))
    return dict(stages)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search, deterministic order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = stage_of(module), stage_of(target)
            if a != b and LAYERS[b] > LAYERS[a]:
                bad.append(f"{module} ({a}, layer {LAYERS[a]}) imports {target} ({b}, layer {LAYERS[b]})")
    return bad


GRAPH = import_graph()


def test_the_graph_sees_lazy_and_string_imports():
    # guards the scanner itself: these edges exist only inside functions or as module-name strings
    assert "lmforge.eval.local_backend" in GRAPH["lmforge.eval.backend_factory"]  # inside a function
    assert "lmforge.data.cli" in GRAPH["lmforge.cli"]  # importlib.import_module("lmforge.data.cli")
    assert "lmforge.model.gguf" in GRAPH["lmforge.model.io"]  # inside a function


def test_every_stage_package_is_in_the_layer_table():
    missing = sorted({stage_of(m) for m in GRAPH} - set(LAYERS))
    assert not missing, f"add {missing} to LAYERS in tests/test_imports.py (and to DESIGN.md's layers)"


def test_no_import_cycle_between_files():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle between files: " + " -> ".join(cycle)


def test_no_import_cycle_between_stage_packages():
    cycle = find_cycle(stage_graph(GRAPH))
    assert cycle is None, "import cycle between stages: " + " -> ".join(cycle)


def test_imports_only_point_down_the_layers():
    bad = upward_edges(GRAPH)
    assert not bad, "imports that point up the layer table:\n" + "\n".join(bad)


@pytest.mark.parametrize("lazy", [False, True])
def test_the_checks_catch_a_planted_arrow_back_up(tmp_path, lazy):
    """A model file importing serve (at the top or inside a function) is both upward and a cycle."""
    pkg = tmp_path / "lmforge"
    for folder in ("model", "serve"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "serve" / "engine.py").write_text("from lmforge.model.layers import attend\n")
    body = "def attend():\n    from lmforge.serve.engine import run\n" if lazy else \
        "from lmforge.serve.engine import run\n\ndef attend():\n    pass\n"
    (pkg / "model" / "layers.py").write_text(body)
    graph = import_graph(tmp_path)
    assert find_cycle(graph) == ["lmforge.model.layers", "lmforge.serve.engine", "lmforge.model.layers"]
    assert find_cycle(stage_graph(graph)) == ["model", "serve", "model"]
    assert upward_edges(graph) == ["lmforge.model.layers (model, layer 1) imports lmforge.serve.engine "
                                   "(serve, layer 3)"]
