"""Imports flow one way: read from the code itself (every ``import`` in every module, those inside
functions included), so a circle cannot come back hidden in a function.

``LAYERS`` is the one place the layering is written, top to bottom. A module may import from a lower
layer, or from its own group (``unpoison.data.formats.npz`` from ``unpoison.data``); groups that share a
layer are independent of each other. Importing ``a.b.c`` from outside ``a.b`` runs ``a/b/__init__.py``
too, so that counts as importing ``a.b``. Inside a group the modules must still form no circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: top to bottom; "|" separates independent groups of one layer
LAYERS = [
    "unpoison.__main__",
    "unpoison.cli",
    "unpoison.bench",
    "unpoison.pipeline",
    "unpoison.detect",
    # the one attack crafted through a defense (its D-VAE in the min-min loop): above both families, so neither
    # imports the other; the attacks package loads it by discovery, which no import statement names
    "unpoison.attacks.em_adaptive",
    "unpoison.attacks | unpoison.defenses",
    "unpoison.disentangle | unpoison.scoring | unpoison.scan | unpoison.distributed | unpoison.checkpoints",
    "unpoison.train | unpoison.viz",
    "unpoison.stream | unpoison.utils",
    "unpoison.data | unpoison.models | unpoison.presets",
    "unpoison._registry | unpoison.outputs | unpoison.tensors | unpoison.accel | unpoison.rng | unpoison.threads"
    " | unpoison._validate",
    "unpoison.params",
    "unpoison.errors",
    "unpoison",  # the package's __init__: the version and the lazy public names, nothing imported eagerly
]

#: optional or slow third-party packages a function may import where it needs them; everything else is
#: imported at the top of the module, so that the import graph below is the whole truth
OPTIONAL = {"ray", "diffusers", "matplotlib", "kornia", "scipy"}


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for p in sorted((SRC / "unpoison").rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if pkg else parts)] = (p, pkg)
    return out


MODULES = _modules()


def _imported(mod: str, pkg: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The unpoison modules an import statement loads (``from X import name`` loads X.name when it is one)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = mod.split(".") if pkg else mod.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [target] + [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    out = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def _imports() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """Module -> the modules it loads (package ``__init__``s run on the way included); and every
    function-level import as (module, line, what)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    in_functions = []
    for mod, (path, pkg) in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        own = {".".join(mod.split(".")[:k]) for k in range(1, mod.count(".") + 2)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if id(node) in nested:
                what = node.names[0].name if isinstance(node, ast.Import) else ("." * node.level + (node.module or ""))
                in_functions.append((mod, node.lineno, what))
            for t in _imported(mod, pkg, node):
                if t == mod:
                    continue
                parts = t.split(".")
                graph[mod] |= {".".join(parts[:k]) for k in range(1, len(parts) + 1)} - own
    return graph, in_functions


GRAPH, IN_FUNCTIONS = _imports()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _group(mod: str) -> tuple[int, str]:
    """(layer index, group) of ``mod``: the longest group name that is ``mod`` or a package above it."""
    best = None
    for i, layer in enumerate(LAYERS):
        for g in (s.strip() for s in layer.split("|")):
            if (mod == g or mod.startswith(g + ".")) and (best is None or len(g) > len(best[1])):
                best = (i, g)
    assert best is not None, f"{mod} is in no layer of LAYERS (tests/test_layers.py): place it"
    return best


def test_the_graph_sees_function_level_imports() -> None:
    """The reader finds imports in functions and a circle among them (a planted example, not the code)."""
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(planted) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert ("unpoison.viz", "matplotlib") in {(m, w) for m, _, w in IN_FUNCTIONS}
    assert GRAPH["unpoison.data.formats.npz"] >= {"unpoison.outputs", "unpoison.errors"}
    # importing a submodule from outside its package runs the package's __init__ as well
    assert "unpoison.data" in GRAPH["unpoison.utils"]


def test_no_import_circle() -> None:
    cycles = _cycles(GRAPH)
    assert not cycles, "import circles (each a set of modules importing each other):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_every_module_has_a_layer() -> None:
    for mod in MODULES:
        _group(mod)


def test_imports_flow_down_the_layers() -> None:
    wrong = []
    for mod, targets in GRAPH.items():
        li, g = _group(mod)
        for t in targets:
            lj, h = _group(t)
            if lj < li or (lj == li and g != h):
                wrong.append(f"{mod} ({g}) imports {t} ({h}): " + ("up a layer" if lj < li else "a sibling group"))
    assert not wrong, "\n".join(sorted(wrong))


def test_function_level_imports_are_optional_dependencies_only() -> None:
    """Imports of the project's own modules or of required packages sit at the top of the module."""
    bad = [f"{m}:{line}: {what}" for m, line, what in IN_FUNCTIONS
           if what.lstrip(".").split(".")[0] not in OPTIONAL or what.startswith(".")]
    assert not bad, "imports inside functions (move them to the top):\n" + "\n".join(bad)

