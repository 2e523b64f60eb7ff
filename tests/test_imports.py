"""The import graph: no module-level import loop in m3jax/, pallas_kernels/ and convert/, and `import m3jax` loads
no converter code.

Edges are the imports that run when a module is loaded (module level, `try` / `if` blocks included); imports inside
functions run at call time and are allowed to point back up (e.g. `m3jax.api.load` imports `convert` lazily), so
they are not edges. Importing `a.b` implies loading package `a` first, which is not counted as an edge of the
importer (Python allows a package's submodules to import each other while the package loads).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("m3jax", "pallas_kernels", "convert")


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


def _load_time_imports(tree: ast.Module):
    """Import nodes that run when the module loads: not inside a def / lambda / class body's methods."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, file in mods.items():
        is_pkg = file.endswith("__init__.py")
        with open(file) as f:
            tree = ast.parse(f.read(), file)
        for node in _load_time_imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = mod.split(".")
                    parts = parts if is_pkg else parts[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n):
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_detects_a_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_sees_the_known_edges():
    g = import_graph()
    assert "m3jax.config" in g["m3jax.cache"]
    assert "pallas_kernels.dispatch" in g["m3jax.model.attention"]
    assert "m3jax.config" in g["convert.weight_map"]
    assert "convert.loader" not in g["m3jax.api"]          # lazy (inside load()): not a load-time edge


def test_no_import_loops():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_m3jax_layers_point_down():
    """m3jax never imports convert at load time (except the command line, which sits above both: `m3jax convert`);
    sharding imports no model code; the model imports no engine."""
    g = import_graph()
    for mod, deps in g.items():
        if mod.startswith("m3jax") and mod != "m3jax.cli":
            assert not any(d.startswith("convert") for d in deps), f"{mod} imports {sorted(deps)}"
    assert not any(d.startswith(("m3jax.model", "m3jax.params", "m3jax.testing")) for d in g["m3jax.sharding"])
    for mod in g:
        if mod.startswith("m3jax.model"):
            assert not g[mod] & {"m3jax.engine", "m3jax.scheduler", "m3jax.runner", "m3jax.params", "m3jax.testing"}


def test_import_m3jax_loads_no_converter_code():
    code = "import sys, m3jax; print(sorted(m for m in sys.modules if m == 'convert' or m.startswith('convert.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "[]", out.stdout
