"""Code (reward "code"). ProRL §3.1: run all test cases; reward = fraction passed, 0 on a syntax error or
when the tests take more than 5 s in total (`reward.sandbox.total_timeout_s`).

The program is the last fenced code block after the thinking block. The ground truth is a JSON object in
one of the formats public code-RL data uses:
  stdin/stdout (APPS, CodeContests, TACO, Eurus-2-RL):  {"inputs": [str, ...], "outputs": [str, ...]}
  function call (APPS/TACO call-based):                {"fn_name": "f", "inputs": [[args], ...], "outputs": [...]}
  asserts (MBPP):                                      {"test_list": ["assert f(1) == 2", ...], "test_setup_code": ""}
  check function (HumanEval):                          {"test": "def check(candidate): ...", "entry_point": "f"}
All test cases of one response run in one sandbox; many responses run concurrently.

Judging happens here, outside the program (issue 18): expected outputs never enter the sandbox.
- stdin/stdout: the program's real output is compared here.
- function tests: the harness (confine/driver.py) calls the function and returns its value as a literal of
  plain built-in types, decoded here with `ast.literal_eval` and compared here, so a return value whose
  __eq__ always succeeds, a shadowed `exec` or a printed pass marker gain nothing. APPS call tests,
  and asserts of the forms `assert f(<literals>) == <literal>` (either side), `... is True/False/None`,
  `assert f(...)`, `assert not f(...)`, `abs(f(...) - v) < tol`, `math.isclose(f(...), v, ...)` and
  `set(f(...)) == set(...)` (HumanEval's `candidate(...)` likewise) become such call tests.
- Any other test form (a `check` with loops, `!=`, ordering or helper expressions; an MBPP assert with
  variables or `and`) is judged by replay (code_judge.py, issue 29): a judge process without the program
  collects the arguments of the test's calls, the program returns literals for exactly those arguments,
  and a fresh judge process replays the test's comparisons on them. The program never sees the test.
  Their share is `reward/code/weak_tests` (replayed tests: they depend on the judge's replay).
Results are decoded with `sandbox_judge.parse_literal`, a parser that builds the values directly (no
syntax tree) and refuses, with the reason, a result nested deeper than the harness writes or one whose
objects would take more than any output of the harness makes (48 bytes per character, 16 MiB at least).
"""

from __future__ import annotations

import ast
import builtins
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from nemo_prorl.config.schema import SandboxConfig
from nemo_prorl.confine import Sandbox, SandboxRun, make_sandbox
from nemo_prorl.rewards.base import REWARDS, RewardInput, RewardResult, failed
from nemo_prorl.rewards.code_judge import Replay, ReplayJudge, check_replay, mbpp_replay, run_rounds
from nemo_prorl.rewards.extract import last_code_block, strip_thinking
from nemo_prorl.rewards.sandbox_judge import parse_literal


@dataclass
class TestPlan:
    """What to run and how to judge it: one program, one input per test, one check per test. Every
    judgement happens here in the trainer; expected values never enter the sandbox."""

    program: str
    inputs: list[str]  # stdin text (stdio) or a harness request (confine/driver.py); "" for a replay test
    checks: list["Check"]
    kind: str  # "stdio" or "driver"
    replays: list[Replay] = field(default_factory=list)  # tests judged by replay (Check "replay": the index)

    @property
    def weak(self) -> int:
        return sum(c.cmp == "replay" for c in self.checks)


@dataclass(frozen=True)
class Check:
    cmp: str  # "stdio", "eq", "in_list" (APPS call outputs), "is", "truthy", "falsy", "close", "set_eq", "replay"
    expected: Any = None
    rel_tol: float = 0.0
    abs_tol: float = 0.0
    strict: bool = False  # abs(...) < tol rather than <= tol


def _literal(node: ast.AST) -> Any:
    return ast.literal_eval(node)  # ValueError/TypeError/SyntaxError for anything not a plain literal


def _call_of(node: ast.AST, names: set[str]) -> Optional[tuple[str, str]]:
    """(args literal source, kwargs literal source) when `node` is `name(<literals>)` for a name in
    `names`; None otherwise."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names):
        return None
    if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
        return None
    try:
        args = [_literal(a) for a in node.args]
        kwargs = {k.arg: _literal(k.value) for k in node.keywords}
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None
    return repr(args), repr(kwargs)


def _is_isclose(node: ast.AST) -> bool:
    f = node.func if isinstance(node, ast.Call) else None
    return (isinstance(f, ast.Attribute) and f.attr == "isclose" and isinstance(f.value, ast.Name)
            and f.value.id == "math") or (isinstance(f, ast.Name) and f.id == "isclose")


def assert_to_call(stmt: ast.stmt, names: set[str]) -> Optional[tuple[str, str, Check]]:
    """Turn `assert f(<literals>) <op> <literal>` and the usual tolerance forms into (args, kwargs, Check);
    None when the statement has another form (it then runs as a weak test)."""
    if not isinstance(stmt, ast.Assert):
        return None
    t = stmt.test
    try:
        if isinstance(t, ast.Compare) and len(t.ops) == 1:
            left, op, right = t.left, t.ops[0], t.comparators[0]
            if isinstance(op, ast.Eq):
                for a, b in ((left, right), (right, left)):
                    call = _call_of(a, names)
                    if call:
                        return (*call, Check("eq", _literal(b)))
                    if isinstance(a, ast.Call) and isinstance(a.func, ast.Name) and a.func.id == "set" \
                            and len(a.args) == 1 and not a.keywords:
                        call = _call_of(a.args[0], names)
                        exp = b.args[0] if isinstance(b, ast.Call) and isinstance(b.func, ast.Name) \
                            and b.func.id == "set" and len(b.args) == 1 else b
                        if call:
                            return (*call, Check("set_eq", list(_literal(exp))))
            if isinstance(op, ast.Is) and isinstance(right, ast.Constant) and right.value in (True, False, None):
                call = _call_of(left, names)
                if call:
                    return (*call, Check("is", right.value))
            if isinstance(op, (ast.Lt, ast.LtE)) and isinstance(left, ast.Call) and isinstance(left.func, ast.Name) \
                    and left.func.id == "abs" and len(left.args) == 1 and isinstance(left.args[0], ast.BinOp) \
                    and isinstance(left.args[0].op, ast.Sub):
                diff = left.args[0]
                for a, b in ((diff.left, diff.right), (diff.right, diff.left)):
                    call = _call_of(a, names)
                    if call:
                        return (*call, Check("close", float(_literal(b)), abs_tol=float(_literal(right)),
                                             strict=isinstance(op, ast.Lt)))
        if _is_isclose(t) and len(t.args) == 2:
            kw = {k.arg: float(_literal(k.value)) for k in t.keywords if k.arg in ("rel_tol", "abs_tol")}
            if len(kw) == len(t.keywords):
                for a, b in ((t.args[0], t.args[1]), (t.args[1], t.args[0])):
                    call = _call_of(a, names)
                    if call:
                        return (*call, Check("close", float(_literal(b)), rel_tol=kw.get("rel_tol", 1e-9),
                                             abs_tol=kw.get("abs_tol", 0.0)))
        call = _call_of(t, names)
        if call:
            return (*call, Check("truthy"))
        if isinstance(t, ast.UnaryOp) and isinstance(t.op, ast.Not):
            call = _call_of(t.operand, names)
            if call:
                return (*call, Check("falsy"))
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None
    return None


def _call_request(fn: str, args: str, kwargs: str, setup: str) -> str:
    return json.dumps({"kind": "call", "fn": fn, "args": args, "kwargs": kwargs, "setup": setup})


def _plan_asserts(tests: list[str], setup: str, program: str = "") -> TestPlan:
    inputs, checks, replays = [], [], []
    for src in tests:
        try:
            mod = ast.parse(src)
        except SyntaxError as e:
            raise ValueError(f"test {src[:80]!r} is not Python: {e}") from e
        names = _tested_names(mod)
        conv = assert_to_call(mod.body[0], names) if len(mod.body) == 1 and len(names) == 1 else None
        if conv is not None:
            inputs.append(_call_request(next(iter(names)), conv[0], conv[1], setup))
            checks.append(conv[2])
        else:  # judged outside the program, by replay
            inputs.append("")
            checks.append(Check("replay", len(replays)))
            replays.append(mbpp_replay(src, setup, program))  # the program: which builtin names it defines
    return TestPlan("", inputs, checks, "driver", replays)


_NOT_TESTED = set(dir(builtins)) | {"math", "isclose"}


def _tested_names(mod: ast.Module) -> set[str]:
    """The functions a test calls that are not builtins: the program's functions under test. Read from
    the test alone, so a program cannot choose how its tests are run."""
    return {n.func.id for n in ast.walk(mod) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
            and n.func.id not in _NOT_TESTED}


def _plan_check(code: str, test: str, entry: str, prompt: str = "") -> TestPlan:
    """HumanEval: `def check(candidate): assert candidate(...) == ...` turned into one call test per
    assert; a check with any other statement is judged whole by replay (one test)."""
    try:
        mod = ast.parse(test)
    except SyntaxError as e:
        raise ValueError(f"'test' is not Python: {e}") from e
    checks_fn = [n for n in mod.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    others = [n for n in mod.body if n not in checks_fn and not _harmless(n)]
    if len(checks_fn) == 1 and not others and checks_fn[0].args.args:
        fn = checks_fn[0]
        alias = fn.args.args[0].arg
        inputs, checks = [], []
        for stmt in fn.body:
            if _harmless(stmt) or (isinstance(stmt, ast.Assert) and isinstance(stmt.test, ast.Constant)):
                continue  # docstrings, `assert True`
            conv = assert_to_call(stmt, {alias})
            if conv is None:
                break
            inputs.append(_call_request(entry, conv[0], conv[1], ""))
            checks.append(conv[2])
        else:
            if inputs:
                return TestPlan(code, inputs, checks, "driver")
    return TestPlan(code, [""], [Check("replay", 0)], "driver", [check_replay(test, entry, prompt)])


def _harmless(node: ast.stmt) -> bool:
    """Statements of a test file that do nothing a call test needs: docstrings, imports, METADATA = {...}."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        return True
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return True
    if isinstance(node, ast.Assign):
        try:
            _literal(node.value)
            return True
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return False
    return False


def plan_tests(code: str, truth: Any) -> TestPlan:
    """Turn a ground-truth object into a TestPlan; ValueError names what is wrong with it."""
    if not isinstance(truth, dict):
        raise ValueError(f"ground truth must be a JSON object, got {type(truth).__name__}")
    if "inputs" in truth and "outputs" in truth:
        ins, outs = truth["inputs"], truth["outputs"]
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs) or not ins:
            raise ValueError("'inputs' and 'outputs' must be non-empty lists of equal length")
        if truth.get("fn_name"):
            fn = str(truth["fn_name"])
            reqs = [_call_request(fn, repr(a if isinstance(a, list) else [a]), "{}", "") for a in ins]
            return TestPlan(code, reqs, [Check("in_list", o) for o in outs], "driver")
        return TestPlan(code, [_as_text(x) for x in ins], [Check("stdio", _as_text(x)) for x in outs], "stdio")
    if "test_list" in truth:
        tests = list(truth["test_list"])
        if not tests or not all(isinstance(t, str) for t in tests):
            raise ValueError("'test_list' must be a non-empty list of strings")
        plan = _plan_asserts(tests, str(truth.get("test_setup_code") or ""), code)
        plan.program = code
        return plan
    if "test" in truth and "entry_point" in truth:
        return _plan_check(code, str(truth["test"]), str(truth["entry_point"]), str(truth.get("prompt") or ""))
    raise ValueError(f"unknown test format with keys {sorted(truth)}; expected inputs/outputs, test_list, "
                     "or test/entry_point")


def _as_text(x: Any) -> str:
    if isinstance(x, list):
        return "\n".join(map(str, x)) + "\n"
    return str(x)


_INT = re.compile(r"[+-]?\d+")


def outputs_match(got: str, expected: str) -> bool:
    """As APPS/CodeContests judges: trailing white space and blank lines do not matter, then tokens must
    match, numbers within a relative/absolute tolerance of 1e-6."""
    g = [ln.rstrip() for ln in got.strip().splitlines()]
    e = [ln.rstrip() for ln in expected.strip().splitlines()]
    if g == e:
        return True
    gt, et = got.split(), expected.split()
    if len(gt) != len(et):
        return False
    for a, b in zip(gt, et):
        if a == b:
            continue
        if _INT.fullmatch(b):  # an integer answer is exact: 1000000001 is not 1000000000 within 1e-6
            return False
        try:
            if not math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6):
                return False
        except ValueError:
            return False
    return True


def _decode(result: str) -> Any:
    """The harness's literal of plain built-in values. Parsed, never evaluated: `parse_literal` builds
    only plain values, so a result cannot run code or carry an object with its own __eq__. It builds them
    without a syntax tree (`ast.literal_eval` took about 270 bytes per byte of result, issue 29) and
    raises ValueError, with the reason, past 101 levels of nesting or more decoded objects than any
    output of the harness makes (sandbox_judge.BYTES_PER_CHAR per character, 16 MiB at least)."""
    return parse_literal(result)


def decode_problem(t: Any) -> str:
    """Why a call test's result could not be decoded ("" when it could, or when it did not run)."""
    if getattr(t, "status", "") != "ok" or not t.result:
        return ""
    try:
        _decode(t.result)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as e:
        return f"result refused: {e}"
    return ""


def _close(got: Any, c: Check) -> bool:
    if type(got) not in (int, float) or isinstance(got, bool):
        return False
    diff = abs(got - c.expected)
    if c.rel_tol:
        return math.isclose(got, c.expected, rel_tol=c.rel_tol, abs_tol=c.abs_tol)
    return diff < c.abs_tol if c.strict else diff <= c.abs_tol


def passes(c: Check, t: Any) -> bool:
    """Whether test run `t` passes check `c`. Values compared here are plain data decoded in the trainer."""
    if t.status != "ok":
        return False
    if c.cmp == "stdio":
        return outputs_match(t.stdout, c.expected)
    try:
        got = _decode(t.result)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return False
    if c.cmp == "eq":
        return bool(got == c.expected)
    if c.cmp == "in_list":  # APPS/TACO: JSON data (tuples as lists), the return value often wrapped in a list
        try:
            got = json.loads(json.dumps(got))
        except (TypeError, ValueError):
            return False
        return bool(got == c.expected or [got] == c.expected)
    if c.cmp == "is":
        return got is c.expected
    if c.cmp == "truthy":
        return bool(got)
    if c.cmp == "falsy":
        return not got
    if c.cmp == "close":
        return _close(got, c)
    if c.cmp == "set_eq":
        try:
            return set(got) == set(c.expected)
        except TypeError:
            return False
    raise ValueError(f"unknown check {c.cmp!r}")


def judge(plan: TestPlan, run: SandboxRun) -> list[bool]:
    return [_passes_safely(c, t) for c, t in zip(plan.checks, run.tests)]


def _passes_safely(c: Check, t: Any) -> bool:
    """A comparison that raises (10**400 against a float tolerance: OverflowError) fails this test only,
    not the row or the batch."""
    try:
        return passes(c, t)
    except Exception:  # noqa: BLE001
        return False


class CodeReward:
    def __init__(self, cfg: Any = None, sandbox: Optional[Sandbox] = None) -> None:
        self.cfg: SandboxConfig = getattr(cfg, "sandbox", None) or SandboxConfig()
        self.sandbox = sandbox or make_sandbox(self.cfg)
        self._pool = ThreadPoolExecutor(self.cfg.num_workers, thread_name_prefix="sandbox")

    def score(self, inp: RewardInput) -> RewardResult:
        return self._score(inp)

    def score_batch(self, inputs: Sequence[RewardInput]) -> list[RewardResult]:
        return list(self._pool.map(self._score, inputs))

    def _score(self, inp: RewardInput) -> RewardResult:
        try:
            truth = json.loads(inp.ground_truth) if isinstance(inp.ground_truth, str) else inp.ground_truth
        except json.JSONDecodeError as e:
            return failed("error", f"ground truth is not JSON: {e}")
        code = last_code_block(strip_thinking(inp.response))
        if code is None:
            return RewardResult(0.0, correct=False, reason="no fenced code block")
        try:
            compile(code, "solution.py", "exec")
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
            return RewardResult(0.0, correct=False, reason=f"syntax error: {e}")
        try:
            plan = plan_tests(code, truth)
        except ValueError as e:
            return failed("error", f"bad test cases: {e}")
        if plan.replays:
            return self._score_with_replays(plan)
        run = self.sandbox.run(plan.program, plan.inputs, driver=plan.kind == "driver")
        if run.error:
            return failed("error", f"sandbox: {run.error}")
        passed = judge(plan, run)
        extra = [decode_problem(t) for c, t, ok in zip(plan.checks, run.tests, passed) if not ok and c.cmp != "stdio"]
        return _result(plan, passed, [run], run.wall_s, extra)

    def _score_with_replays(self, plan: TestPlan) -> RewardResult:
        """Call tests run as always, in the program's first run; the replay tests' record requests ride
        along in it, and their verdicts come from the judge (code_judge.py)."""
        calls = [k for k, c in enumerate(plan.checks) if c.cmp != "replay"]

        def first_run(requests: list[str]) -> tuple[SandboxRun, list]:
            run = self.sandbox.run(plan.program, [plan.inputs[k] for k in calls] + requests, driver=True)
            return run, run.tests[len(calls):]

        rj = ReplayJudge(self.sandbox, plan.program, plan.replays)
        out = run_rounds(rj, first_run)  # runs the program once at least, unless a judge run failed
        if out.error or not out.runs or out.runs[0].error:
            return failed("error", out.error or f"sandbox: {out.runs[0].error if out.runs else 'no run'}")
        runs = out.runs
        call_passed = [_passes_safely(plan.checks[k], t) for k, t in zip(calls, runs[0].tests)]
        passed, extra, it = [], [], iter(call_passed)
        for k, c in enumerate(plan.checks):
            passed.append(out.passed[c.expected] if c.cmp == "replay" else next(it, False))
        extra += [decode_problem(t) for k, t, ok in zip(calls, runs[0].tests, call_passed) if not ok]
        extra += [r for r in out.reasons if r]
        return _result(plan, passed, runs, sum(r.wall_s for r in runs), extra)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _result(plan: TestPlan, passed: list[bool], runs: list[SandboxRun], wall_s: float,
            extra: list[str]) -> RewardResult:
    """The row's reward from its verdicts; `extra`: reasons of failed tests beyond the run statuses."""
    statuses = [t.status for r in runs for t in r.tests]
    frac = sum(passed) / len(plan.inputs)
    info = {"tests_passed": frac, "sandbox_s": wall_s, "weak_tests": plan.weak / len(plan.inputs)}
    if "timeout" in statuses:  # ProRL: more than the time budget scores 0
        return RewardResult(0.0, correct=False, reason="time limit exceeded", info=info)
    bad = sorted({s for s in statuses if s != "ok"})
    first = {s: next(_first_stderr(r, s) for r in runs if any(t.status == s for t in r.tests)) for s in bad}
    notes = [f"{s}: {first[s]}" for s in bad] + list(dict.fromkeys(e for e in extra if e))[:3]
    return RewardResult(frac, correct=frac == 1.0, reason="; ".join(notes), info=info)


def _first_stderr(run: SandboxRun, status: str) -> str:
    t = next(t for t in run.tests if t.status == status)
    last = t.stderr.strip().splitlines()[-1:] or [f"exit code {t.returncode}"]
    return last[0][:200]


REWARDS.register("code")(CodeReward)
