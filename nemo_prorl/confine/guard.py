"""The state guard of the verifier workers (workers.py): a snapshot of what a scorer's code and tables are,
taken in the worker before each call and compared after it. An answer that a scorer evaluates (countdown's
parse_expr) runs inside the scorer's process and could patch the scorer for every later answer of that
worker; a changed verifier means the answer was hostile, and the worker that saw it ends."""

from __future__ import annotations

import builtins
import sys
import types
from typing import Any, Callable, Optional

_MISSING = object()
# Providers of (label, object) pairs whose attributes the state guard checks too: objects a scorer keeps
# between calls (rewards/reasoning_gym.py registers its cached datasets).
GUARDED_OBJECTS: list[Callable[[], list[tuple[str, Any]]]] = []
# what os.fork itself replaces in the child (threading re-creates its locks)
_FORK_CHANGES = frozenset({("threading", "_active_limbo_lock"), ("threading", "_shutdown_locks_lock"),
                           ("threading", "_shutdown_locks")})
_PLAIN = (bool, int, float, complex, str, bytes, type(None))
_BUILTIN_NAMES = frozenset(dir(builtins))
# Packages whose classes are checked too (a scorer's method replaced on its class); module globals are
# checked for every module.
_CLASS_CHECKED = ("reasoning_gym", "math_verify", "sympy.parsing", "nemo_prorl", "latex2sympy2")


# Checked modules: the scorers' own packages whole, the top level of the libraries they call (sympy's
# ~400 submodules would cost more than the scoring), and the standard modules scorers use. Checking
# every module would cost ~10 ms per call in a worker holding reasoning-gym and sympy.
_GUARDED_PACKAGES = ("reasoning_gym", "math_verify", "latex2sympy2", "nemo_prorl")
_GUARDED_MODULES = frozenset({"builtins", "sympy", "numpy", "re", "math", "cmath", "json", "fractions", "decimal",
                              "operator", "functools", "itertools", "collections", "random", "statistics",
                              "string", "ast", "sympy.parsing.sympy_parser", "sympy.core.sympify"})


def _guarded(name: str) -> bool:
    return name in _GUARDED_MODULES or name.split(".")[0] in _GUARDED_PACKAGES


class StateGuard:
    """A snapshot of the verifier's state, taken in the worker before a call: the guarded modules' globals,
    the classes of the scorer packages, the code and defaults of their functions and methods, and the
    contents of the scorer packages' tables (dicts, lists, sets). A scorer that evals the answer
    (countdown's parse_expr) lets the answer patch the scorer within that very call - replace a global
    (`sorted`, `np.isclose`), swap a method's `__code__` in place, or edit an override table - and the
    patch would last for every later answer of this worker; the worker checks after each call that
    nothing changed, and a changed verifier means the answer is hostile."""

    def __init__(self) -> None:
        self.n = len(sys.modules)
        self.items: list[tuple[str, Any, dict]] = []
        self.functions: list[tuple[str, types.FunctionType, tuple]] = []  # (label, function, its state)
        self.tables: list[tuple[str, Any, Any]] = []
        self._seen: set[int] = set()  # a function or table imported into several modules is checked once
        for name, mod in list(sys.modules.items()):
            d = getattr(mod, "__dict__", None)
            if not _guarded(name) or not isinstance(d, dict):
                continue
            self._take(name, d, scorer=name.split(".")[0] in _GUARDED_PACKAGES)
            if name.startswith(_CLASS_CHECKED):
                for v in list(d.values()):
                    if isinstance(v, type) and v.__module__ == name:
                        self._take(f"{name}.{v.__name__}", v.__dict__, scorer=False)
        for provider in GUARDED_OBJECTS:  # the scorers' own long-lived objects (cached datasets)
            for label, obj in provider():
                if isinstance(getattr(obj, "__dict__", None), dict):
                    self._take(label, obj.__dict__, scorer=True)

    def _take(self, name: str, d: Any, *, scorer: bool) -> None:
        self.items.append((name, d, dict(d)))
        for k, v in d.items():
            if id(v) in self._seen or k == "__builtins__":  # builtins: checked as the module "builtins"
                continue
            self._seen.add(id(v))
            if isinstance(v, types.FunctionType) and _guarded(getattr(v, "__module__", None) or ""):
                self.functions.append((f"{name}.{k}", v, _function_state(v)))
            elif scorer and type(v) in (dict, list, set) and len(v) <= _TABLE_MAX:
                self.tables.append((f"{name}.{k}", v, _table_state(v)))

    def changed(self) -> Optional[str]:
        """The first global that was replaced by something else than a value of the same plain type, or
        added (but a submodule, or a plain value under a name that does not shadow a builtin); then the
        first function whose code, defaults or closure changed, and the first table whose entries did;
        None if nothing. Libraries flip flags and counters in their globals (math_verify's warning flag);
        an attack replaces functions, modules and objects (`sorted`, `np`) or shadows builtins."""
        for name, d, copy in self.items:
            for k, v in copy.items():
                new = d.get(k, _MISSING)
                if new is not v and not (type(new) is type(v) and type(v) in _PLAIN) \
                        and (name, k) not in _FORK_CHANGES:
                    return f"{name}.{k}"
            if len(d) != len(copy):
                for k in d.keys() - copy.keys():
                    v = d[k]
                    if isinstance(v, types.ModuleType) or k == "__warningregistry__":
                        continue
                    if type(v) not in _PLAIN or k in _BUILTIN_NAMES:
                        return f"{name}.{k}"
        for name, fn, (code, defaults, kwdefaults, cells) in self.functions:
            if fn.__code__ is not code or fn.__defaults__ is not defaults or fn.__kwdefaults__ is not kwdefaults \
                    or (cells and _cells(fn) != cells):
                return f"{name} (its code, defaults or closure)"
        for name, table, state in self.tables:
            if _table_state(table) != state:
                return f"{name} (its entries)"
        return None


# Tables larger than this are data (word lists, caches), not dispatch tables; their check would cost more
# than the scoring.
_TABLE_MAX = 4096


def _function_state(fn: types.FunctionType) -> tuple:
    """What a patch can change in place on a function object (`__globals__` is read-only)."""
    return (fn.__code__, fn.__defaults__, fn.__kwdefaults__, _cells(fn))


def _cells(fn: types.FunctionType) -> tuple:
    """A closure's contents by identity (a plain value by type: libraries keep counters there)."""
    return tuple(_identity(_cell(c)) for c in fn.__closure__ or ())


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # not yet bound
        return _MISSING


def _identity(v: Any) -> Any:
    return type(v) if type(v) in _PLAIN else id(v)


def _table_state(table: Any) -> Any:
    if type(table) is dict:
        return tuple((_identity(k), _identity(v)) for k, v in table.items())
    if type(table) is list:
        return tuple(_identity(v) for v in table)
    return frozenset(_identity(v) for v in table)
