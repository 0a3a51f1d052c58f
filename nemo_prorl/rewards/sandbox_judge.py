"""The judge for code tests that are no plain call (issue 29): loops, `!=`, ordering, helper expressions,
MBPP asserts with variables. Standard library only: it runs as the program of a sandbox run of its own
(copied to /sbx/solution.py) whose files hold the test code and recorded literals, never the judged
program. It reads one request from stdin and prints one JSON line last.

  {"mode": "collect", "test", "run", "prompt", "setup", "bind": {name: fn}, "known": {key: result}}
      runs the test with each bound name (`candidate`, the MBPP function) a recorder that notes the
      arguments of every call and returns a placeholder (or the known result of an earlier round). Every
      statement is made soft (its exceptions swallowed) so one failing comparison does not hide the calls
      after it. Prints {"calls": [[fn, args, kwargs], ...], "pending": n, "error": ""}; `pending` counts
      calls whose arguments depend on results not known yet (another round).
  {"mode": "replay", ...}
      runs the test for real, each bound name replaying the program's recorded result for exactly those
      arguments (any other arguments fail the test). Prints {"passed": bool, "error": "...", "unrecorded":
      bool, "calls": n}; `unrecorded`: a call with arguments the program never received (another round may
      record it); `calls`: calls of bound names replayed (no pass without one: a test that never called the
      program judged none).

A result is "v:<literal>" (the return value, parsed by `parse_literal`, never evaluated), "e:<Name>" (the
call raised an exception of that builtin type or one derived from it; StopIteration and its kin are refused) or "x:<reason>" (no result: the program died, or the value was no plain
data); the last fails the test even inside the test's own `try/except Exception`.

`parse_literal` is also the trainer's decoder for call results (code.py): it builds the values directly,
without the syntax tree `ast.literal_eval` builds (about 270 bytes of it per byte of result).
"""

import ast
import builtins
import json
import random
import re
import sys

MAX_DEPTH = 101  # levels of brackets the harness's encoder writes at most (it refuses a value below depth 100)
MAX_CALLS = 20000
# The most decoded bytes (as `_cost` counts them) one character of `encode`'s output can stand for:
# measured 42 for `[{0: {0: set()}}, ...]` (empty sets in one-entry dicts, the dearest units it writes; an
# empty list 18, `[5]` 22). A budget of this much per character refuses only forged text (`encode` writes
# ", " and ": " with their spaces); call tests read every result `ast.literal_eval` read (issue 29).
BYTES_PER_CHAR = 48
_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_TOKEN = re.compile(r"\s*(?:(?P<s>[bB]?['\"])"  # a string's opening quote: _string finds its end
                    r"|(?P<c>\([-+]?" + _NUM + r"[-+]" + _NUM + r"j\))"
                    r"|(?P<n>[-+]?" + _NUM + r"j?)|(?P<w>True|False|None|set\(\))|(?P<p>[\[\](){}:,]))", re.S)
_WORDS = {"True": True, "False": False, "None": None}
_CLOSE = {"[": "]", "(": ")", "{": "}"}


def _string(text, start, quote_at):
    """(value, end) of the string literal whose quote is at `quote_at`. Found with str.find, not a
    regular expression: a pattern for escapes keeps state per escape (100x a long escaped string)."""
    q, pos, escaped = text[quote_at], quote_at + 1, False
    while True:
        end = text.find(q, pos)
        if end < 0:
            raise ValueError(f"unterminated string at offset {start}")
        slashes = 0
        while text[end - 1 - slashes] == "\\":
            slashes += 1
        escaped = escaped or text.find("\\", pos, end) >= 0
        if slashes % 2 == 0:
            break
        pos = end + 1
    tok = text[start:end + 1]
    if "\n" in tok:
        raise ValueError(f"line break inside a string at offset {start}")
    if not escaped and quote_at == start:
        return tok[1:-1], end + 1
    return ast.literal_eval(tok), end + 1  # escapes or bytes: this one token, parsed alone


def _scalar(m):
    if m.group("c"):
        return ast.literal_eval(m.group("c"))
    if m.group("n"):
        tok = m.group("n")
        if tok[-1] == "j":
            return ast.literal_eval(tok)
        if re.fullmatch(r"[-+]?\d+", tok):
            return int(tok)
        return float(tok)
    w = m.group("w")
    return set() if w == "set()" else _WORDS[w]


def _close_frame(opener, items, colons, comma):
    if opener == "[":
        return items
    if opener == "(":
        if len(items) == 1 and not comma:
            raise ValueError("a parenthesised value is no tuple")
        return tuple(items)
    if colons:
        if colons != list(range(1, len(items), 2)) or len(items) % 2:
            raise ValueError("malformed dict")
        return {items[i]: items[i + 1] for i in range(0, len(items), 2)}
    if not items:
        return {}
    return set(items)


def _cost(value):
    """Bytes a decoded value adds: the reference to it, plus the object unless it is one of CPython's
    shared singletons (None, booleans, small ints, (), '' and one-character Latin-1 strings), which
    `literal_eval` shares too and which cost nothing more however often they occur."""
    t = type(value)
    if value is None or t is bool or (t is int and -5 <= value <= 256) or value == () and t is tuple \
            or (t is str and len(value) <= 1 and (not value or ord(value) < 256)):
        return 8
    return sys.getsizeof(value) + 8


def parse_literal(text, max_depth=MAX_DEPTH, budget=None):
    """The value of a Python literal of plain built-in types (what the harness's `encode` writes).
    ValueError, with the reason, for anything else, for nesting deeper than `max_depth` and for a value
    whose objects would take more than `budget` bytes (default: BYTES_PER_CHAR per character of text,
    16 MiB at least), so a 1 MiB result costs a bounded multiple and whatever `encode` writes is read."""
    if budget is None:
        budget = max(16 << 20, BYTES_PER_CHAR * len(text))
    stack, pos, root, done, used, prev = [], 0, None, False, 0, "start"
    while True:
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip():
                raise ValueError(f"not a plain literal at offset {pos}")
            break
        pos, p, where = m.end(), m.group("p"), m.start()
        if done:
            raise ValueError(f"text after the value at offset {where}")
        expect_value = prev in ("start", "open", ",", ":")
        if p in (",", ":"):
            if expect_value or not stack:
                raise ValueError(f"unexpected {p!r} at offset {where}")
            frame = stack[-1]  # [opener, items, indexes of items that follow a ':', saw a comma]
            if p == ":":
                if frame[0] != "{":
                    raise ValueError(f"unexpected ':' at offset {where}")
                frame[2].append(len(frame[1]))
            frame[3] = frame[3] or p == ","
            prev = p
            continue
        if p in ("]", ")", "}"):
            if not stack or _CLOSE[stack[-1][0]] != p or prev == ":" or (prev == "," and not stack[-1][1]):
                raise ValueError(f"unexpected {p!r} at offset {where}")
            value = _close_frame(*stack.pop())
            used += _cost(value)
        else:
            if not expect_value:
                raise ValueError(f"missing comma at offset {where}")
            if p:
                if len(stack) >= max_depth:
                    raise ValueError(f"result nested deeper than {max_depth} levels")
                stack.append([p, [], [], False])
                prev = "open"
                continue
            if m.group("s"):
                value, pos = _string(text, m.start("s"), m.end("s") - 1)
            else:
                value = _scalar(m)
            used += _cost(value)
        if used > budget:
            raise ValueError(f"result would take more than {budget / (1 << 20):.0f} MiB decoded")
        if stack:
            stack[-1][1].append(value)
        else:
            root, done = value, True
        prev = "value"
    if not done:
        raise ValueError("incomplete literal")
    return root


def canon(v, depth=0):
    """A canonical literal for an argument (sets sorted: the same arguments give the same key in every
    process, whatever its hash seed). TypeError for a value that is no plain data; _Pending inside
    raises PendingArg (a result of this round not known yet)."""
    t = type(v)
    if depth > MAX_DEPTH:
        raise ValueError("argument nested too deeply")
    if t is _Pending:
        raise PendingArg()
    if t is float and v != v:
        raise ValueError("NaN argument")
    if t is float and v in (float("inf"), float("-inf")):
        return "1e999" if v > 0 else "-1e999"
    if t in (bool, int, float, complex, str, bytes, type(None)):
        return repr(v)
    if t in (list, tuple):
        inner = ", ".join(canon(x, depth + 1) for x in v)
        return f"[{inner}]" if t is list else f"({inner}{',' if len(v) == 1 else ''})"
    if t in (set, frozenset):
        return "{" + ", ".join(sorted(canon(x, depth + 1) for x in v)) + "}" if v else "set()"
    if t is dict:
        return "{" + ", ".join(f"{canon(k, depth + 1)}: {canon(x, depth + 1)}" for k, x in v.items()) + "}"
    raise TypeError(f"an argument of type {t.__name__} is no plain data")


class PendingArg(Exception):
    pass


class Refused(BaseException):
    """Fails the test; a BaseException so that the test's own `except Exception` cannot swallow it."""


class _Pending:
    """A result not known yet (collection only): it takes part in any expression and is falsy/empty."""

    def _self(self, *a, **k):
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _self
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __neg__ = __pos__ = _self
    __abs__ = __getitem__ = __call__ = __getattr__ = _self
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = lambda self, o: False

    def __bool__(self):
        return False

    def __len__(self):
        return 0

    def __iter__(self):
        return iter(())

    def __hash__(self):
        return 0

    def __index__(self):
        return 0

    def __float__(self):
        return 0.0


def _exception(name):
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls
    return type(name, (Exception,), {})  # the program's own class: only `except Exception` catches it


# Raised from inside a call that `map`, a generator or a comprehension drives, these end that iteration
# quietly (PEP 479 turns them into RuntimeError only inside generators): `all(map(f, xs))` would pass.
_ENDS_ITERATION = ("StopIteration", "StopAsyncIteration", "GeneratorExit")


def materialize(result):
    tag, _, body = result.partition(":")
    if tag == "v":
        try:
            return parse_literal(body)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
            raise Refused(f"the program's result could not be read: {e}") from None
    if tag == "e":
        if body in _ENDS_ITERATION:  # would end `all(map(f, ...))` early, as if every result were true
            raise Refused(f"the program raised {body}, which would silently end the test's iteration")
        cls = _exception(body)
        exc = cls.__new__(cls)  # without __init__: UnicodeDecodeError's takes five arguments
        exc.args = (f"raised by the program: {body}",)
        raise exc
    raise Refused(body or "no result")


class _Soft(ast.NodeTransformer):
    """Each statement in a try/except Exception: pass, so that collection goes on past a failing one."""

    KEEP = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom, ast.Global,
            ast.Nonlocal)

    def generic_visit(self, node):
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(node, field, None)
            if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
                setattr(node, field, [s if isinstance(s, self.KEEP) else self._wrap(s) for s in stmts])
        return node

    @staticmethod
    def _wrap(s):
        handler = ast.ExceptHandler(type=ast.Name("Exception", ast.Load()), name=None, body=[ast.Pass()])
        return ast.copy_location(ast.Try(body=[s], handlers=[handler], orelse=[], finalbody=[]), s)


def run(req):
    mode, known = req["mode"], req.get("known") or {}
    state = {"calls": [], "seen": set(), "pending": 0, "refused": "", "n": 0, "unrecorded": False}

    def recorder(fn):
        def call(*args, **kwargs):
            state["n"] += 1
            if state["n"] > MAX_CALLS:  # noted: a bare `except:` in the test must not swallow it
                state["refused"] = state["refused"] or f"the test makes more than {MAX_CALLS} calls"
                raise Refused(state["refused"])
            try:
                key = [fn, canon(list(args)), canon(dict(kwargs))]
            except PendingArg:
                state["pending"] += 1
                return _Pending()
            except (TypeError, ValueError) as e:
                state["refused"] = state["refused"] or f"{fn}(...): {e}; the judge carries plain data only"
                raise Refused(state["refused"]) from None
            k = "\n".join(key)
            if k in known:
                if mode == "collect":
                    try:
                        return materialize(known[k])
                    except Refused:  # no result: what depends on it is not collected
                        return _Pending()
                try:
                    return materialize(known[k])
                except Refused as e:  # noted too: a bare `except:` in the test must not swallow it
                    state["refused"] = state["refused"] or str(e)
                    raise
            if mode == "replay":
                state["unrecorded"] = True
                state["refused"] = f"{fn} was called with arguments the program never received"
                raise Refused(state["refused"])
            if k not in state["seen"]:
                state["seen"].add(k)
                state["calls"].append(key)
            return _Pending()
        return call

    tree = ast.parse(req["test"] + "\n" + (req.get("run") or ""), "test")
    if mode == "collect":
        tree = ast.fix_missing_locations(_Soft().visit(tree))
    ns = {"__name__": "__judge__"}
    random.seed(0)  # tests that draw random inputs draw the same ones in every round and in the replay
    error = ""
    try:
        for part, name in ((req.get("prompt"), "prompt"), (req.get("setup"), "setup")):
            if part:
                exec(compile(part, name, "exec"), ns)
        for name, fn in req["bind"].items():
            ns[name] = recorder(fn)
        exec(compile(tree, "test", "exec"), ns)
    except Refused as e:
        error = str(e)
    except BaseException as e:  # noqa: BLE001  a failing comparison (or the test exiting): the test failed
        error = f"{type(e).__name__}: {str(e)[:200]}"
    error = state["refused"] or error
    if mode == "replay" and not error and not state["n"]:  # a test that never ran the program proves nothing
        error = ("the test binds no function of the program" if not req["bind"]
                 else "the test never called the program")
    nonce = req.get("nonce", "")  # printed text of the test cannot pass for the verdict: it lacks this
    if mode == "collect":
        return {"calls": state["calls"], "pending": state["pending"], "error": error, "nonce": nonce}
    return {"passed": not error, "error": error, "unrecorded": state["unrecorded"], "calls": state["n"],
            "nonce": nonce}


def _fixed_hash_seed():
    """Re-run this interpreter with PYTHONHASHSEED=0 (before stdin is read): a test iterating a set of
    strings must call the program in the same order in every collect and replay run of its rounds."""
    import os

    if sys.flags.hash_randomization and "PYTHONHASHSEED" not in os.environ and hasattr(sys, "orig_argv"):
        # (once: the variable is then set, so no loop). -I would ignore it (it implies -E): keep -s and -P
        isolated = ("-s", "-P") if sys.version_info >= (3, 11) else ("-s",)  # -P is new in 3.11
        argv = [x for a in sys.orig_argv for x in (isolated if a == "-I" else (a,))]
        os.execve(sys.executable, argv, {**os.environ, "PYTHONHASHSEED": "0"})


if __name__ == "__main__":
    _fixed_hash_seed()
    out = run(json.loads(sys.stdin.read()))
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()
