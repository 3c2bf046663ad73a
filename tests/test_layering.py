"""The package structure holds: the parts of msjax (models, engine, runtime, comm, planner, cli, the top-level
modules) and serving import one another without cycles — lazy imports inside functions counted, since a cycle
hidden in a function is still a cycle in the design — and nothing under msjax/ or serving/ reaches into JAX's
private `jax._src` (pallas_kernels' interpreter helpers aside). Read from the source (no imports), so a cycle
fails here before it fails at import time somewhere else."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = ("msjax", "serving", "pallas_kernels")


def _unit(module: str) -> str | None:
    """The part a module belongs to: msjax.<subpackage or module>, serving, pallas_kernels."""
    parts = module.split(".")
    if parts[0] == "msjax":
        return "msjax." + parts[1] if len(parts) > 1 else "msjax"
    return parts[0] if parts[0] in TREES else None


def _modules():
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            if "proto" in path.parts:  # generated gRPC stubs
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            yield name, path, ast.parse(path.read_text(), str(path))


def _imports(tree: ast.AST):
    """(imported module names, line) of every import statement, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield [node.module, *(f"{node.module}.{a.name}" for a in node.names)], node.lineno


def _graph():
    edges, where = collections.defaultdict(set), {}
    for name, path, tree in _modules():
        unit = _unit(name)
        if unit == "msjax" or name == "msjax.__main__":  # the facade re-exports everything by design
            continue
        for names, line in _imports(tree):
            for imported in names:
                target = _unit(imported)
                if target and target not in (unit, "msjax"):
                    edges[unit].add(target)
                    where.setdefault((unit, target), f"{path.relative_to(ROOT)}:{line}")
    return edges, where


def _cycle(edges) -> list[str] | None:
    """One cycle of the graph as a list of units, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(unit):
        state[unit] = 1
        path.append(unit)
        for nxt in sorted(edges.get(unit, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[unit] = 2
        return None

    for unit in sorted(edges):
        if unit not in state and (found := visit(unit)):
            return found
    return None


def test_the_parts_import_without_cycles():
    edges, where = _graph()
    assert {"msjax.models", "msjax.engine", "msjax.runtime", "msjax.comm", "msjax.planner", "msjax.cli",
            "serving"} <= set(edges)  # the graph saw every part
    cycle = _cycle(edges)
    assert cycle is None, " -> ".join(cycle) + ": " + ", ".join(where[a, b] for a, b in zip(cycle, cycle[1:]))


def test_the_layers_point_one_way():
    """The engine decides, the runtime runs: the runtime never imports the engine, and the communication layer
    knows neither (nor the model)."""
    edges, where = _graph()
    for low, high in [("msjax.runtime", "msjax.engine"), ("msjax.comm", "msjax.runtime"),
                      ("msjax.comm", "msjax.engine"), ("msjax.comm", "msjax.models"),
                      ("msjax.models", "msjax.runtime"), ("serving", "msjax.cli")]:
        assert high not in edges[low], f"{low} imports {high} at {where[low, high]}"


def test_a_cycle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_private_jax_outside_the_kernel_interpreter_helpers():
    found = []
    for name, path, tree in _modules():
        if name.startswith("pallas_kernels"):
            continue
        for names, line in _imports(tree):
            if any(n == "jax._src" or n.startswith("jax._src.") for n in names):
                found.append(f"{path.relative_to(ROOT)}:{line}")
    assert not found, f"jax._src imported at {found}"
