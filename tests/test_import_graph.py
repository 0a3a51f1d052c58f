"""The package's modules import one another in one direction (issue 32): no two modules import each other,
directly or round a longer circle. An import inside a function counts: it is still an arrow, only a later one.
Imports under `if TYPE_CHECKING:` never run and are left out.

Run as a script (`python tests/test_import_graph.py`) to print every circle it finds."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "nemo_prorl"
ROOT = Path(__file__).resolve().parents[1]

# Issue 32's open item: rollout/pool takes TransferBuffer and WeightRelay from weight_sync, which checks for
# EnginePool. It is untied with the redesign of the weight sync, not here; until then it is the one circle
# allowed.
# Nothing else may be added here (cluster/__init__ <-> cluster/actors, which this test found, is untied:
# the session lives in cluster/current.py).
ALLOWED_CIRCLES = [{"nemo_prorl.rollout.pool", "nemo_prorl.weight_sync"}]


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
    local, remote = "nemo_prorl.rewards.sandbox", "nemo_prorl.rewards.sandbox_remote"
    assert not (remote in g[local] and local in g[remote])
    assert not any({local, remote} <= c for c in circles(g))


def test_no_other_import_circles():
    found = [sorted(c) for c in circles(import_graph()) if c not in ALLOWED_CIRCLES]
    assert not found, f"modules that import each other (round a circle): {found}"


if __name__ == "__main__":
    g = import_graph()
    for c in circles(g):
        print("circle:", " ".join(sorted(c)), "(allowed, see ALLOWED_CIRCLES)" if c in ALLOWED_CIRCLES else "")
        for m in sorted(c):
            print("   ", m, "->", ", ".join(sorted(t for t in g[m] if t in c)))
