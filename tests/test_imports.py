"""No import cycles inside ``plait``, at module level or inside functions.

Every module under core/, plugins/ and kernels/ is parsed with ``ast`` (nothing is imported), and every
``import plait.…`` / ``from plait.… import …`` / relative import anywhere in the file (module level, inside a
function, under ``if TYPE_CHECKING``) becomes an edge to the module it names:

* ``from P import name`` is an edge to ``P.name`` when that is a module, else to ``P`` (a package's
  ``__init__``, which is what defines ``name``); ``import P.Q`` is an edge to ``P.Q``.
* Parent packages are not edges: importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` too, but a package
  whose ``__init__`` imports its own submodules (a plugin's hooks building its objects) would then look circular
  with every submodule that imports a sibling, which Python handles (the package is already in ``sys.modules``).
* Imports by string (``importlib.import_module`` of ``DEFAULT_PLUGINS``, entry points) are not edges: the
  manager loads plugins by name so that the core names no method.

Cycles are the strongly connected components of more than one module (Tarjan), cross-checked against a
brute-force transitive closure. The folder → package map is read from pyproject.toml's ``package-dir``.
"""
from __future__ import annotations

import ast
import os
import random
import re
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Cycles that are known and kept, each with the reason. Key: the frozenset of the cycle's modules.
ALLOWED_CYCLES: dict[frozenset[str], str] = {}


# ----------------------------------------------------------------------------------------------- the graph
def package_dirs(root: Path = ROOT) -> dict[str, str]:
    """``{"core": "plait", "plugins": "plait.plugins", …}`` from pyproject.toml's ``package-dir`` line."""
    text = (root / "pyproject.toml").read_text()
    line = re.search(r"^package-dir\s*=\s*\{(.*)\}\s*$", text, re.M)
    assert line, "pyproject.toml has no package-dir = { … } line"
    return {folder: pkg for pkg, folder in re.findall(r'"([\w.]+)"\s*=\s*"([\w./]+)"', line.group(1))}


def collect_modules(root: Path, dirs: dict[str, str]) -> dict[str, tuple[Path, bool]]:
    """``{module name: (file, is_package)}`` for every .py file under the folders (symlinks not followed)."""
    modules: dict[str, tuple[Path, bool]] = {}
    for folder, pkg in dirs.items():
        base = root / folder
        for dirpath, dirnames, filenames in os.walk(base):  # followlinks=False: core/kernels is a link
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            rel = Path(dirpath).relative_to(base).parts
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                if fn == "__init__.py":
                    modules[".".join((pkg, *rel))] = (Path(dirpath) / fn, True)
                else:
                    modules[".".join((pkg, *rel, fn[:-3]))] = (Path(dirpath) / fn, False)
    return modules


def import_edges(name: str, path: Path, is_package: bool, modules: dict) -> list[tuple[str, int, bool]]:
    """``[(target module, line, inside a function)]`` for every plait import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if is_package else name.rpartition(".")[0]
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    edges = []

    def add(target: str, node: ast.AST) -> None:
        if target in modules and target != name:
            edges.append((target, node.lineno, id(node) in in_function))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 > len(parts) - 1:
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base != "plait" and not base.startswith("plait."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base, node)
    return edges


def build_graph(root: Path = ROOT, dirs: dict[str, str] | None = None):
    """``(graph {module: {target: (line, in_function)}}, modules)``."""
    modules = collect_modules(root, package_dirs(root) if dirs is None else dirs)
    graph: dict[str, dict[str, tuple[int, bool]]] = {m: {} for m in modules}
    for name, (path, is_package) in modules.items():
        for target, line, in_fn in import_edges(name, path, is_package, modules):
            graph[name].setdefault(target, (line, in_fn))
    return graph, modules


# ----------------------------------------------------------------------------------------------- cycles
def tarjan_scc(graph: dict[str, dict]) -> list[set[str]]:
    """Strongly connected components (Tarjan 1972), iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[set[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    out.append(comp)
    return out


def cycles(graph: dict[str, dict]) -> list[frozenset[str]]:
    return sorted((frozenset(c) for c in tarjan_scc(graph) if len(c) > 1), key=sorted)


def closure_cycles(graph: dict[str, dict]) -> list[frozenset[str]]:
    """The same components by brute force: u and v share a cycle iff each reaches the other."""
    reach = {}
    for u in graph:
        seen, todo = set(), deque(graph[u])
        while todo:
            w = todo.popleft()
            if w not in seen:
                seen.add(w)
                todo.extend(graph[w])
        reach[u] = seen
    comps = {frozenset({u} | {v for v in reach[u] if u in reach[v]}) for u in graph}
    return sorted((c for c in comps if len(c) > 1), key=sorted)


def describe(comp: frozenset[str], graph: dict[str, dict], modules: dict) -> str:
    """One concrete circle through the component, each edge with its file:line."""
    start = min(comp)
    prev = {start: None}
    todo = deque([start])
    found = None
    while todo and found is None:
        v = todo.popleft()
        for w in sorted(graph[v]):
            if w == start:
                found = v
                break
            if w in comp and w not in prev:
                prev[w] = v
                todo.append(w)
    path = [found]
    while prev[path[-1]] is not None:
        path.append(prev[path[-1]])
    path.reverse()
    hops = []
    for a, b in zip(path, path[1:] + [start]):
        line, in_fn = graph[a][b]
        hops.append(f"{a} -> {b} ({modules[a][0].relative_to(ROOT)}:{line}"
                    f"{', in a function' if in_fn else ''})")
    return f"{sorted(comp)}:\n    " + "\n    ".join(hops)


# ----------------------------------------------------------------------------------------------- tests
def test_no_import_cycles_inside_plait():
    graph, modules = build_graph()
    found = cycles(graph)
    unexplained = [c for c in found if c not in ALLOWED_CYCLES]
    assert not unexplained, "import cycles inside plait:\n" + "\n".join(describe(c, graph, modules)
                                                                       for c in unexplained)
    stale = [sorted(c) for c in ALLOWED_CYCLES if c not in found]
    assert all(len(reason.strip()) > 20 for reason in ALLOWED_CYCLES.values()), "each allowed cycle needs a reason"
    assert not stale, f"allow-listed cycles that no longer exist (drop them): {stale}"


def test_the_graph_covers_the_tree():
    graph, modules = build_graph()
    # every .py file of the three folders, counted independently of the walker (core/kernels is a link)
    files = {p for folder in ("core", "plugins", "kernels") for p in (ROOT / folder).rglob("*.py")
             if "__pycache__" not in p.parts and not (ROOT / "core" / "kernels") in p.parents}
    assert {path for path, _ in modules.values()} == files
    assert modules["plait"][0] == ROOT / "core" / "__init__.py"
    assert "plait.kernels.dp_clip" in modules and "plait.plugins.flashdp.prv" in modules
    # edges of each form, read off the source by hand: absolute from-import of a name defined in a package
    # __init__, relative from-import of a sibling module, import inside a function
    assert "plait" in graph["plait.plugins.flashdp"]                 # from plait import hookimpl
    assert "plait.plugins.flashdp.rdp" in graph["plait.plugins.flashdp.prv"]  # from .rdp import …
    assert graph["plait.plugins.flashdp.accountant"]["plait.plugins.flashdp.prv"][1]  # lazy, in a function
    assert "plait.errors" in graph["plait.run"]


def test_the_split_accountant_modules_point_one_way():
    graph, _ = build_graph()
    p = "plait.plugins.flashdp."
    order = ["history", "rdp", "prv", "accountant"]  # each may import only those before it
    for i, mod in enumerate(order):
        for target in graph[p + mod]:
            if target.startswith(p) and target[len(p):] in order:
                assert order.index(target[len(p):]) < i, f"{mod} imports {target}"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_finds_a_circle_closed_inside_a_function(tmp_path):
    # the old flashdp shape: prv imports accountant at module level, accountant imports prv in a function
    _write(tmp_path, {
        "pyproject.toml": 'package-dir = { "plait" = "core", "plait.plugins" = "plugins" }\n',
        "core/__init__.py": "",
        "core/errors.py": "",
        "plugins/__init__.py": "",
        "plugins/dp/__init__.py": "from plait import errors\n",
        "plugins/dp/accountant.py": "import math\n\ndef eps():\n    from .prv import compose\n    return compose\n",
        "plugins/dp/prv.py": "from .accountant import eps\nfrom plait.plugins.dp import accountant\n",
        "plugins/dp/sub/__init__.py": "",
        "plugins/dp/sub/deep.py": "from ..prv import eps\nfrom ... import dp\nimport plait.errors\n",
    })
    graph, modules = build_graph(tmp_path)
    assert set(modules) == {"plait", "plait.errors", "plait.plugins", "plait.plugins.dp", "plait.plugins.dp.accountant",
                            "plait.plugins.dp.prv", "plait.plugins.dp.sub", "plait.plugins.dp.sub.deep"}
    assert graph["plait.plugins.dp.accountant"] == {"plait.plugins.dp.prv": (4, True)}
    assert graph["plait.plugins.dp.prv"] == {"plait.plugins.dp.accountant": (1, False)}
    assert set(graph["plait.plugins.dp.sub.deep"]) == {"plait.plugins.dp.prv", "plait.plugins.dp", "plait.errors"}
    assert graph["plait.plugins.dp"] == {"plait.errors": (1, False)}
    assert cycles(graph) == [frozenset({"plait.plugins.dp.accountant", "plait.plugins.dp.prv"})]
    # the split: both import a module below them, and the circle is gone
    _write(tmp_path, {"plugins/dp/history.py": "",
                      "plugins/dp/prv.py": "from .history import StepHistory\n",
                      "plugins/dp/accountant.py": "from .history import StepHistory\n\ndef eps():\n"
                                                  "    from .prv import compose\n"})
    assert cycles(build_graph(tmp_path)[0]) == []


def test_finds_a_circle_through_a_package_init(tmp_path):
    _write(tmp_path, {
        "pyproject.toml": 'package-dir = { "plait" = "core" }\n',
        "core/__init__.py": "from plait.run import go\n",
        "core/run.py": "from . import errors\n",
        "core/errors.py": "from plait import hookimpl\n",
    })
    graph, _ = build_graph(tmp_path)
    assert cycles(graph) == [frozenset({"plait", "plait.run", "plait.errors"})]


def test_tarjan_agrees_with_the_closure_on_random_graphs():
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 12)
        p = rng.choice([0.05, 0.15, 0.3])
        graph = {str(i): {str(j): (0, False) for j in range(n) if j != i and rng.random() < p} for i in range(n)}
        assert cycles(graph) == closure_cycles(graph), graph


def test_tarjan_agrees_with_the_closure_on_the_tree():
    graph, _ = build_graph()
    assert cycles(graph) == closure_cycles(graph)



def test_readme_layout_table_matches_the_tree():
    """README's "folder → import name" table says where an import lives; it is read back against package-dir."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Where the code is", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if len(cells) == 3:
            rows[cells[0].strip("`")] = (cells[1].strip("`"), cells[2])
    dirs = package_dirs()
    graph, modules = build_graph()
    for folder, pkg in dirs.items():
        assert rows[f"{folder}/"][0] == pkg, (folder, rows.get(f"{folder}/"))
    # every plugin folder has its own row or is named in the plugins/<method>/ row, and nothing else is
    plugin_pkgs = sorted(p.parent.name for p in (ROOT / "plugins").glob("*/__init__.py"))
    own_rows = [f.split("/")[1] for f in rows if f.startswith("plugins/") and f.count("/") == 2 and "<" not in f]
    pkg, what = rows["plugins/<method>/"]
    assert pkg == f"{dirs['plugins']}.<method>"
    named = re.findall(r"`(\w+)`", what)
    assert sorted(named + own_rows) == plugin_pkgs
    for name in own_rows:
        assert rows[f"plugins/{name}/"][0] == f"{dirs['plugins']}.{name}" and f"{dirs['plugins']}.{name}" in modules
    # the worked example in the text
    assert "`from plait.run import train_loop` is `core/run.py`" in section.replace("\n", " ")
    assert "plait.run" in modules and "train_loop" in (ROOT / "core" / "run.py").read_text()
