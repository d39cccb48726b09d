"""The import graph of zspa_jax/, models/ and convert/ has no cycle.

Every module's imports are read with `ast`, those inside functions included (a deferred
import that dodges a cycle at load time is still one). `from a.b import c` is an edge to
module a.b.c where that is a module, else to a.b; a package's own __init__ is not an edge
of its submodules' imports (Python runs it first, but the tree above models/ would
otherwise be one cycle through zspa_jax/__init__.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("zspa_jax", "models", "convert")


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    (tmp_path / "c.py").write_text("import a\n")
    modules = {p.stem: p for p in tmp_path.glob("*.py")}
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(graph) == [["a", "b"]]


def test_the_packages_import_graph_has_no_cycle():
    graph = import_graph()
    assert "zspa_jax.host" in graph["zspa_jax.batch"]  # the walk sees the real imports
    assert "zspa_jax.sharding" in graph["zspa_jax.estimate.cli"]  # inside a function too
    assert cycles(graph) == []


def test_the_estimate_core_and_the_host_layer_import_no_family():
    graph = import_graph()
    for name in (
        "zspa_jax.estimate",
        "zspa_jax.estimate.flops",
        "zspa_jax.estimate.memory",
        "zspa_jax.estimate.hooks",
        "zspa_jax.estimate.presets",
        "zspa_jax.host",
        "zspa_jax.batch",
    ):
        families = {m for m in graph[name] if m.startswith("zspa_jax.families.")}
        assert not families, f"{name} imports {sorted(families)}"
    models = {m for m in graph if m.startswith("models")}
    assert all(not m.startswith("zspa_jax") for name in models for m in graph[name])


def test_importing_a_family_loads_neither_the_estimate_cli_nor_its_presets():
    """A family's estimate hooks import the estimate core only (the package's other names
    are imported on first use)."""
    import subprocess
    import sys

    code = (
        "import sys, zspa_jax.families.llava_next, zspa_jax.families.qwen2_5_vl\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('zspa_jax.estimate'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    loaded = set(proc.stdout.split())
    assert "zspa_jax.estimate.hooks" in loaded
    assert not loaded & {
        "zspa_jax.estimate.cli",
        "zspa_jax.estimate.presets",
        "zspa_jax.estimate.model",
    }
