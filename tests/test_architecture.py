"""The package's shape (docs/DESIGN.md §6): layers that import only downwards, no import circle,
small modules, a short top level, and the deprecated module paths still working.

Imports are read from the source (every ``import`` statement, at module level or inside a
function: a lazy import is still a dependency), so nothing is imported to check them.
"""
import ast
import importlib
import os
import sys
import warnings

import pytest

import safekern

ROOT = os.path.dirname(safekern.__file__)

# Bottom to top. A module may import its own subpackage and anything on a lower rank.
# ``safekern.data`` (data files and the scripts that build them) imports nothing else of
# safekern; the deprecated aliases and the package root sit on top.
RANKS = {
    "safekern._version": 0, "safekern._checks": 0, "safekern.spec": 0, "safekern.data": 0,
    "safekern.reference": 1,
    "safekern.ops": 2,
    "safekern.safety": 3,
    "safekern.models": 4,
    "safekern.runtime": 5,
    "safekern.integrations": 6,
    "safekern.evaluation": 7,
    "safekern.training": 8,
    "safekern.cli": 9,
}
DEPRECATED = ("safekern.model", "safekern.engine", "safekern.recipe", "safekern.train")
MAX_LINES = 460          # "no module over ~450 lines"
MAX_KERNEL_LINES = 720   # kernel files in ops/ (one op each): "up to ~700"


def _modules():
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel[:-9] if rel.endswith(".__init__") else rel] = path
    return out


MODULES = _modules()


def _imports(name, path):
    """The safekern modules ``name`` imports (resolved to modules, not attributes)."""
    is_pkg = path.endswith("__init__.py")
    deps = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = name if is_pkg else name.rsplit(".", 1)[0]
                parts = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != name:
                deps.add(t)
    return deps


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _unit(m):
    """``(rank, subpackage)`` of a module; the root and the deprecated aliases are on top."""
    for prefix, rank in RANKS.items():
        if m == prefix or m.startswith(prefix + "."):
            return rank, prefix
    assert m == "safekern" or m in DEPRECATED, f"{m}: not in any layer of RANKS"
    return len(RANKS), m


def test_every_import_points_down():
    bad = []
    for m, deps in GRAPH.items():
        rank, unit = _unit(m)
        for d in deps:
            drank, dunit = _unit(d)
            if dunit != unit and not drank < rank:
                bad.append(f"{m} -> {d}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


def test_no_import_circle():
    index, low, stack, on, cycles, n = {}, {}, [], set(), [], [0]

    def visit(v):                    # Tarjan's strongly connected components
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(GRAPH)))
    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_the_walk_sees_the_imports():
    """The checks above would pass on an empty graph: make sure they read real edges."""
    runtime = {d for m in GRAPH if m.startswith("safekern.runtime") for d in GRAPH[m]}
    assert "safekern.safety.prompts" in runtime and "safekern.ops.dispatch" in runtime
    assert "safekern.ops.dispatch" in GRAPH["safekern.ops.head_sample"]


def test_small_modules_and_a_short_top_level():
    top = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
    assert len(top) <= 8, f"modules at the top of safekern/: {top}"
    long = []
    for m, path in MODULES.items():
        n = sum(1 for _ in open(path, encoding="utf-8"))
        limit = MAX_KERNEL_LINES if m.startswith("safekern.ops.") else MAX_LINES
        if n > limit:
            long.append(f"{m}: {n} lines (> {limit})")
    assert not long, "\n".join(long)


@pytest.mark.parametrize("old,name", [("safekern.model", "attach"),
                                      ("safekern.model", "load_safety"),
                                      ("safekern.engine", "generate"),
                                      ("safekern.recipe", "train_frozen"),
                                      ("safekern.recipe", "train_real"),
                                      ("safekern.train", "EssTrainer")])
def test_deprecated_module_paths_forward_with_a_warning(old, name):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    assert callable(getattr(module, name))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        getattr(module, "no_such_name")
