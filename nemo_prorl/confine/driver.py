"""The harness that runs inside the sandbox for function tests (copied to /sbx/driver.py; standard
library only). It reads one request from stdin before the program runs, loads the program from
/sbx/solution.py into a namespace of its own, and writes to fd 3.

  {"kind": "call", "fn": "f", "args": "<Python literal of the argument list>", "setup": "..."}
      writes the return value as a Python literal of plain built-in types; the trainer compares it with
      the expected value (which never enters the sandbox). A value of any other type (an object whose
      __eq__ always succeeds) is refused.
  {"kind": "record", "calls": [[fn, args, kwargs], ...], "setup": "..."}
      for a test that is no plain call (issue 29): calls the function with each argument list and writes
      one line per call, "<i>:v:<literal>" (the return value), "<i>:e:<ExceptionName>" (it raised: the nearest builtin class) or
      "<i>:x:<reason>" (no plain data). The test itself never enters the sandbox: a judge process that
      never ran the program replays its comparisons on these literals (rewards/sandbox_judge.py).
"""

import ast
import builtins
import json
import os
import sys

_write, _exec, _compile, _type = os.write, builtins.exec, builtins.compile, type  # before the program runs
_PLAIN = (bool, int, float, complex, str, bytes, type(None))
# The builtin exception classes, taken before the program runs (it may rebind builtins' names)
_BUILTIN_EXC = {c: n for n, c in vars(builtins).items() if isinstance(c, type) and issubclass(c, BaseException)}


def encode(v, depth=0):
    """A Python literal for `v`, built from exact built-in types only (subclasses are refused: they can
    override comparison)."""
    t = _type(v)
    if depth > 100:
        raise ValueError("return value nested too deeply")
    if t is float and v != v:
        raise ValueError("the return value is NaN, which equals nothing")
    if t is float and v in (float("inf"), float("-inf")):
        return "1e999" if v > 0 else "-1e999"
    if t in _PLAIN:
        return repr(v)
    if t in (list, tuple):
        inner = ", ".join(encode(x, depth + 1) for x in v)
        return f"[{inner}]" if t is list else f"({inner}{',' if len(v) == 1 else ''})"
    if t in (set, frozenset):
        return "{" + ", ".join(encode(x, depth + 1) for x in v) + "}" if v else "set()"
    if t is dict:
        return "{" + ", ".join(f"{encode(k, depth + 1)}: {encode(x, depth + 1)}" for k, x in v.items()) + "}"
    raise TypeError(f"return value of type {t.__name__} is not plain data")


def main():
    req = json.loads(sys.stdin.read())
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "solution.py"), encoding="utf-8") as f:
        src = f.read()
    ns = {"__name__": "solution", "__builtins__": builtins}
    _exec(_compile(src, "solution.py", "exec"), ns)
    if req.get("setup"):
        _exec(_compile(req["setup"], "setup", "exec"), ns)
    if req["kind"] == "call":
        fn = ns.get(req["fn"])
        if fn is None and "Solution" in ns:
            fn = getattr(ns["Solution"](), req["fn"])
        if fn is None:
            raise NameError(f"the program defines no function {req['fn']!r}")
        args = ast.literal_eval(req["args"])
        kwargs = ast.literal_eval(req.get("kwargs") or "{}")
        out = encode(fn(*args, **kwargs))
        _write(3, out.encode("utf-8", "surrogatepass"))
    elif req["kind"] == "record":
        for i, (name, args, kwargs) in enumerate(req["calls"]):
            _write(3, f"{i}:{record(ns, name, args, kwargs)}\n".encode("utf-8", "surrogatepass"))
    else:
        raise ValueError(f"unknown request kind {req['kind']!r}")


def record(ns, name, args, kwargs):
    """One call's outcome as a line: each is written before the next call, so a program that ends the
    process midway loses only the calls after it (they read as "no result" and fail)."""
    fn = ns.get(name)
    if fn is None and "Solution" in ns:
        fn = getattr(ns["Solution"](), name, None)
    if fn is None:
        return f"x:the program defines no function {name!r}"
    try:  # read before the call: a failure here is the harness's, not an exception of the program
        args, kwargs = ast.literal_eval(args), ast.literal_eval(kwargs)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        return "x:the arguments could not be read: " + " ".join(str(e).split())[:200]
    try:
        value = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001  an exception is an outcome the test may expect
        return "e:" + builtin_base(_type(e))
    try:
        return "v:" + encode(value)
    except (TypeError, ValueError, RecursionError) as e:
        return "x:" + " ".join(str(e).split())[:200]


def builtin_base(cls):
    """The name of the nearest builtin class `cls` derives from (the program's `class Bad(ValueError)` is
    a ValueError to the judge, which never sees the program's classes)."""
    try:
        for c in _type.__getattribute__(cls, "__mro__"):  # type's own __mro__: no metaclass can reorder it
            if c in _BUILTIN_EXC:
                return _BUILTIN_EXC[c]
    except Exception:  # noqa: BLE001  an odd class: the judge still knows it is an Exception
        pass
    return "Exception"


if __name__ == "__main__":  # run as the sandbox's entry; imported by tests for `encode`
    main()
