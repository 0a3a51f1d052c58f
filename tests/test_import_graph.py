"""The package's modules import one another in one direction (issue 32): no two modules import each other,
directly or round a longer circle, and the layers issue 32 named stay in order (LAYERS: what runs hostile code
confined below the verifiers and their users, the evaluation core below `prorl eval`, the weight sync's wire
format below the engines). An import inside a function counts: it is still an arrow, only a later one.
Imports under `if TYPE_CHECKING:` never run and are left out.

Run as a script (`python tests/test_import_graph.py`) to print every circle it finds."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "nemo_prorl"
ROOT = Path(__file__).resolve().parents[1]

# Empty, and to stay so. The last ones were untied by issue 32: rollout/pool <-> weight_sync (the sync now
# owns its protocol in weight_sync/sync.py, and the pool imports only the wire format, weight_sync/buffer.py)
# and cluster/__init__ <-> cluster/actors (the session lives in cluster/current.py).
ALLOWED_CIRCLES: list[set[str]] = []


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / PKG).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it names in an import statement, at module level or in a function."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:  # `from pkg import submodule` names the submodule
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else base)
            for t in targets:
                while t and t not in mods and "." in t:  # `import a.b.c` of a name inside a module
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_config_loader_and_validate_import_one_way():
    g = import_graph()
    loader, validate = "nemo_prorl.config.loader", "nemo_prorl.config.validate"
    assert not (validate in g[loader] and loader in g[validate])
    assert not any({loader, validate} <= c for c in circles(g))


def test_sandbox_and_remote_sandbox_import_one_way():
    g = import_graph()
    local, remote = "nemo_prorl.confine.sandbox", "nemo_prorl.confine.remote"
    assert not (remote in g[local] and local in g[remote])
    assert not any({local, remote} <= c for c in circles(g))


def test_no_other_import_circles():
    found = [sorted(c) for c in circles(import_graph()) if c not in ALLOWED_CIRCLES]
    assert not found, f"modules that import each other (round a circle): {found}"


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def _reaches(graph: dict[str, set[str]], low: str, high: str) -> list[str]:
    """The modules of package `low` that import (directly or not) a module of package `high`."""
    return sorted(m for m in graph if m == low or m.startswith(low + ".")
                  if any(t == high or t.startswith(high + ".") for t in reachable(graph, m)))


# Issue 32's layers: what runs hostile code confined sits below the verifiers and everything that uses it
# (the code reward, the verifiers, the doctor, the config checks, the trainer), and the evaluation core
# below both the trainer's validation and `prorl eval`.
LAYERS = [("nemo_prorl.confine", above) for above in ("nemo_prorl.rewards", "nemo_prorl.trainer", "nemo_prorl.policy",
                                                      "nemo_prorl.rollout", "nemo_prorl.cluster", "nemo_prorl.eval",
                                                      "nemo_prorl.doctor")] + \
         [("nemo_prorl.trainer", "nemo_prorl.eval"),
          # the weight sync: the engines speak its wire format only (buffer.py), and the sync reaches the
          # engine pool through what the pool exposes, never by import
          ("nemo_prorl.rollout", "nemo_prorl.weight_sync.sync"),
          ("nemo_prorl.rollout", "nemo_prorl.weight_sync.sender"),
          ("nemo_prorl.weight_sync", "nemo_prorl.rollout"), ("nemo_prorl.weight_sync.buffer", "nemo_prorl.policy")]


def test_the_layers_run_one_way():
    g = import_graph()
    wrong = {f"{low} -> {high}": _reaches(g, low, high) for low, high in LAYERS if _reaches(g, low, high)}
    assert not wrong, f"modules that import a layer above their own: {wrong}"


def test_the_layer_check_can_fail():
    g = {"a.x": {"a.y"}, "a.y": {"b.z"}, "b.z": set()}
    assert _reaches(g, "a", "b") == ["a.x", "a.y"] and _reaches(g, "b", "a") == []


if __name__ == "__main__":
    g = import_graph()
    for c in circles(g):
        print("circle:", " ".join(sorted(c)), "(allowed, see ALLOWED_CIRCLES)" if c in ALLOWED_CIRCLES else "")
        for m in sorted(c):
            print("   ", m, "->", ", ".join(sorted(t for t in g[m] if t in c)))
