"""The layout's rules, checked on the source with ``ast``: no import cycle among the project's modules,
the coordinator's side and the client's side meet only in ``volunteer.core``, and the data-only core
loads without torch or hivemind."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("volunteer", "coordinator_seeds")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports, at module level or inside functions alike."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name not in PACKAGES:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = 2, path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_the_projects_modules() -> None:
    graph = import_graph()
    assert len(graph) > 30, "the scan found the project's modules"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_two_sides_meet_only_in_the_shared_core() -> None:
    graph = import_graph()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items() for target in targets
        if (module.startswith("volunteer.") and target.startswith("coordinator_seeds"))
        or (module.startswith("coordinator_seeds") and target.startswith("volunteer.")
            and not target.startswith("volunteer.core."))
    )
    assert not wrong, wrong
    core = [m for m in graph if m.startswith("volunteer.core.")]
    assert core, "the shared core exists"
    upward = [f"{m} imports {t}" for m in core for t in graph[m] if not t.startswith("volunteer.core.")]
    assert not upward, upward


@pytest.mark.parametrize("module", ["volunteer.core.manifest", "volunteer.core.blocks", "volunteer.core.paths",
                                    "volunteer.config.sources"])
def test_data_only_modules_load_without_torch_or_hivemind(module: str) -> None:
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'hivemind') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# The client's packages, lowest first: a package imports only those below it (or core, its own).
LAYERS = ("core", ("config", "host"), "serving", "planning", "node", "views")


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "volunteer" or len(parts) < 3:
        return None  # volunteer.cli and volunteer.demo sit on top of everything
    return next(i for i, layer in enumerate(LAYERS) if parts[1] in (layer if isinstance(layer, tuple) else (layer,)))


def test_the_client_packages_depend_downwards_only() -> None:
    """core < config, host < serving < planning (it builds experts to measure them) < node < views."""
    graph = import_graph()
    upward = sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets
                    if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m))
    sideways = sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets
                      if _layer(m) is not None and _layer(m) == _layer(t) and m.split(".")[1] != t.split(".")[1])
    assert not upward and not sideways, upward + sideways
