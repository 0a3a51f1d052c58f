"""Code (reward "code"). ProRL §3.1: run all test cases; reward = fraction passed, 0 on a syntax error or
when the tests take more than 5 s in total (`reward.sandbox.total_timeout_s`).

The program is the last fenced code block after the thinking block. The ground truth is a JSON object in
one of the formats public code-RL data uses:
  stdin/stdout (APPS, CodeContests, TACO, Eurus-2-RL):  {"inputs": [str, ...], "outputs": [str, ...]}
  function call (APPS/TACO call-based):                {"fn_name": "f", "inputs": [[args], ...], "outputs": [...]}
  asserts (MBPP):                                      {"test_list": ["assert f(1) == 2", ...], "test_setup_code": ""}
  check function (HumanEval):                          {"test": "def check(candidate): ...", "entry_point": "f"}
All test cases of one response run in one sandbox; many responses run concurrently.

Harness results are read from a line with a per-run random marker; a program that deliberately reads its
own harness could forge it (assert/call formats only). Stdin/stdout tests compare the real output.
"""

from __future__ import annotations

import json
import math
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from nemo_prorl.config.schema import SandboxConfig
from nemo_prorl.rewards.base import REWARDS, RewardInput, RewardResult, failed
from nemo_prorl.rewards.extract import last_code_block, strip_thinking
from nemo_prorl.rewards.sandbox import Sandbox, SandboxRun, make_sandbox


@dataclass
class TestPlan:
    """What to run and how to judge it: one program, one stdin per test, one check per test."""

    program: str
    inputs: list[str]
    expected: list[Any]
    kind: str  # "stdio", "call", "assert", "check"
    marker: str = ""


_CALL_HARNESS = """
import json as _j, sys as _s
_args = _j.loads(_s.stdin.read())
_f = globals().get({fn!r})
if _f is None and "Solution" in globals():
    _f = getattr(Solution(), {fn!r})
_r = _f(*_args)
print({marker!r} + _j.dumps(_r))
"""
_ASSERT_HARNESS = """
import sys as _s
_tests = {tests!r}
exec({setup!r})
exec(_tests[int(_s.stdin.read())])
print({marker!r})
"""
_CHECK_HARNESS = """
{test}
check({entry})
print({marker!r})
"""


def plan_tests(code: str, truth: Any) -> TestPlan:
    """Turn a ground-truth object into a TestPlan; ValueError names what is wrong with it."""
    if not isinstance(truth, dict):
        raise ValueError(f"ground truth must be a JSON object, got {type(truth).__name__}")
    marker = f"__prorl_{secrets.token_hex(8)}__"
    if "inputs" in truth and "outputs" in truth:
        ins, outs = truth["inputs"], truth["outputs"]
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs) or not ins:
            raise ValueError("'inputs' and 'outputs' must be non-empty lists of equal length")
        if truth.get("fn_name"):
            program = code + "\n" + _CALL_HARNESS.format(fn=truth["fn_name"], marker=marker)
            return TestPlan(program, [json.dumps(a if isinstance(a, list) else [a]) for a in ins], outs, "call", marker)
        return TestPlan(code, [_as_text(x) for x in ins], [_as_text(x) for x in outs], "stdio")
    if "test_list" in truth:
        tests = list(truth["test_list"])
        if not tests:
            raise ValueError("'test_list' is empty")
        program = code + "\n" + _ASSERT_HARNESS.format(tests=tests, setup=truth.get("test_setup_code", ""), marker=marker)
        return TestPlan(program, [str(i) for i in range(len(tests))], [None] * len(tests), "assert", marker)
    if "test" in truth and "entry_point" in truth:
        program = code + "\n" + _CHECK_HARNESS.format(test=truth["test"], entry=truth["entry_point"], marker=marker)
        return TestPlan(program, [""], [None], "check", marker)
    raise ValueError(f"unknown test format with keys {sorted(truth)}; expected inputs/outputs, test_list, "
                     "or test/entry_point")


def _as_text(x: Any) -> str:
    if isinstance(x, list):
        return "\n".join(map(str, x)) + "\n"
    return str(x)


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
        try:
            if not math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6):
                return False
        except ValueError:
            return False
    return True


def judge(plan: TestPlan, run: SandboxRun) -> list[bool]:
    passed = []
    for t, exp in zip(run.tests, plan.expected):
        if t.status != "ok":
            passed.append(False)
        elif plan.kind == "stdio":
            passed.append(outputs_match(t.stdout, exp))
        elif plan.kind == "call":
            line = next((ln for ln in reversed(t.stdout.splitlines()) if ln.startswith(plan.marker)), None)
            try:
                val = json.loads(line[len(plan.marker):]) if line is not None else _MISSING
            except json.JSONDecodeError:
                val = _MISSING
            passed.append(val is not _MISSING and (val == exp or [val] == exp))
        else:
            passed.append(plan.marker in t.stdout.splitlines())
    return passed


_MISSING = object()


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
        run = self.sandbox.run(plan.program, plan.inputs)
        if run.error:
            return failed("error", f"sandbox: {run.error}")
        passed = judge(plan, run)
        statuses = [t.status for t in run.tests]
        frac = sum(passed) / len(plan.inputs)
        info = {"tests_passed": frac, "sandbox_s": run.wall_s}
        if "timeout" in statuses:  # ProRL: more than the time budget scores 0
            return RewardResult(0.0, correct=False, reason="time limit exceeded", info=info)
        bad = sorted({s for s in statuses if s != "ok"})
        reason = ("; ".join(f"{s}: {_first_stderr(run, s)}" for s in bad)) if bad else ""
        return RewardResult(frac, correct=frac == 1.0, reason=reason, info=info)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _first_stderr(run: SandboxRun, status: str) -> str:
    t = next(t for t in run.tests if t.status == status)
    last = t.stderr.strip().splitlines()[-1:] or [f"exit code {t.returncode}"]
    return last[0][:200]


REWARDS.register("code")(CodeReward)
