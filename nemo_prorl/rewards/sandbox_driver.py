"""The harness that runs inside the sandbox for function tests (copied to /sbx/driver.py; standard
library only). It reads one request from stdin before the program runs, loads the program from
/sbx/solution.py into a namespace of its own, and writes to fd 3.

  {"kind": "call", "fn": "f", "args": "<Python literal of the argument list>", "setup": "..."}
      writes the return value as a Python literal of plain built-in types; the trainer compares it with
      the expected value (which never enters the sandbox). A value of any other type (an object whose
      __eq__ always succeeds) is refused.
  {"kind": "assert", "stmt": "assert ...", "setup": "...", "token": "..."}
      a test that could not be turned into a call ("weak"): it runs in the program's process, and the
      token is written when it passes. A program that searches its own process can forge this; the
      trainer counts such tests in reward/code/weak_tests.
"""

import ast
import builtins
import json
import os
import sys

_write, _exec, _compile, _type = os.write, builtins.exec, builtins.compile, type  # before the program runs
_PLAIN = (bool, int, float, complex, str, bytes, type(None))


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
    else:
        _exec(_compile(req["stmt"], "test", "exec"), ns)
        _write(3, req["token"].encode())


main()
