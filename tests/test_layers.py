"""The package's layers: every import between clipse's folders points down, and no modules
import each other in a loop. docs/architecture.md draws the same stack."""

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "clipse"

# Lowest first. A module may import its own folder and any folder of a lower layer; folders of
# one layer do not import each other. The top-level modules are the typed config and the commands.
LAYERS = (
    ("__init__", "util"),
    ("losses", "data", "models"),
    ("evaluation",),
    ("config",),
    ("runs",),
    ("trackers",),
    ("training",),
    ("executors",),
    ("search",),
    ("report",),
    ("train", "final", "eval_retrieval", "journal", "pretrain", "leaderboard"),
)
RANK = {folder: rank for rank, folders in enumerate(LAYERS) for folder in folders}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def folder_of(module: str) -> str:
    """``clipse.search.study`` -> ``search``; ``clipse.config`` -> ``config``; ``clipse`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(root: Path) -> dict[str, set[str]]:
    """Every module of the package and the clipse modules it imports (at any depth of its code,
    type-checking imports included), resolved to module names that exist."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                            for alias in node.names}
        found[name] = {t for t in targets if t.split(".")[0] == root.name and t in modules}
    return found


def upward_imports(root: Path) -> list[str]:
    problems = []
    for module, targets in imports(root).items():
        here = folder_of(module)
        if here not in RANK:
            problems.append(f"{module}: its folder '{here}' has no layer (add it to LAYERS)")
            continue
        for target in targets:
            there = folder_of(target)
            if there != here and RANK.get(there, len(LAYERS)) >= RANK[here]:
                problems.append(f"{module} ({here}, layer {RANK[here]}) imports {target} ({there}, layer "
                                f"{RANK.get(there)})")
    return sorted(problems)


def import_loops(root: Path) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan's algorithm)."""
    graph = imports(root)
    index, low, stack, on_stack, loops, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor == node:
                continue
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                loops.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return loops


def test_every_import_between_folders_points_down():
    assert upward_imports(PACKAGE) == []


def test_no_modules_import_each_other_in_a_loop():
    assert import_loops(PACKAGE) == []


@pytest.mark.parametrize("planted,where", [
    ("from clipse.search.study import count_trials\n", "data/truth.py"),     # a lower layer reaching up
    ("from clipse.models import create_model\n", "losses/weighted.py"),      # a peer of the same layer
    ("from clipse.training import train\n", "training/distributed.py"),      # a loop inside one folder
])
def test_a_planted_upward_import_or_loop_is_caught(tmp_path, planted, where):
    copy = tmp_path / "clipse"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / where
    target.write_text(planted + target.read_text())
    assert upward_imports(copy) or import_loops(copy)
