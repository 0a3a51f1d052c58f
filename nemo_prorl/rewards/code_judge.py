"""Judging code tests that are no plain call outside the program (issue 29, item 4).

A HumanEval `check` with loops, `!=`, ordering or helper expressions, or an MBPP assert with variables
or `and`, used to run inside the judged program's process, where a wrong program could return an
always-equal object, patch the builtins the assert calls, or read the pass token from the driver's frame.
Now such a test is judged in three steps, none of which lets the program see the test:

  1. collect: a judge process (sandbox_judge.py, a sandbox run of its own, without the program) runs the
     test with the function under test bound to a recorder, every statement soft, and lists the argument
     literals of every call;
  2. record: the program runs in the sandbox on exactly those arguments (confine/driver.py "record"); its
     return values come back as plain literals (or the name of the exception raised);
  3. replay: a fresh judge process runs the test for real with the function replaying those literals for
     exactly those arguments. The test passes iff that run completes.

Arguments that depend on results (`candidate(candidate(2))`, a loop over results) take another round:
when the replay meets arguments the program never received, collect again with the known results and
record the new calls (at most MAX_ROUNDS rounds).
"""

from __future__ import annotations

import ast
import builtins
import json
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from nemo_prorl.confine import Sandbox, SandboxRun, TestRun
from nemo_prorl.rewards.sandbox_judge import canon, parse_literal

JUDGE = Path(__file__).with_name("sandbox_judge.py")
MAX_ROUNDS = 4
# Sandbox runs one row may take, each up to reward.sandbox.total_timeout_s: per round the program's record run,
# a judge collect and a judge replay (run_rounds: the first collect, then MAX_ROUNDS replays, and between
# them MAX_ROUNDS - 1 collect/record pairs). The worker's derived timeout counts a code row as this many.
SANDBOX_RUNS_PER_ROW = 3 * MAX_ROUNDS
# The program's recorded results one test may carry to the judge: each round's record run returns at most
# reward.sandbox.max_output_bytes (1 MiB by default) per test, so four rounds of full results; more fails
# the test with its reason rather than handing the judge (and its decoder) an unbounded request.
MAX_KNOWN_BYTES = MAX_ROUNDS << 20
_NOT_PROGRAM = set(dir(builtins))


@dataclass(frozen=True)
class Replay:
    """One test judged by replay: its source, what to run after it, and which of its names stand for
    the program's functions (`candidate` -> the entry point; an MBPP function -> itself)."""

    test: str
    run: str = ""
    bind: tuple[tuple[str, str], ...] = ()
    prompt: str = ""  # the problem's own code (HumanEval helpers such as `poly`): trusted, run by the judge
    setup: str = ""
    refused: str = ""  # why this test cannot be judged outside the program (it then fails with this reason)


def defined_names(*sources: str) -> set[str]:
    """Names a piece of test code binds itself (assignments, defs, imports, parameters)."""
    out: set[str] = set()
    for src in sources:
        if not src:
            continue
        for n in ast.walk(ast.parse(src)):
            if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                out.add(n.id)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(n.name)
            elif isinstance(n, ast.arg):
                out.add(n.arg)
            elif isinstance(n, ast.alias):
                out.add((n.asname or n.name).split(".")[0])
            elif isinstance(n, ast.ExceptHandler) and n.name:
                out.add(n.name)
    return out


def used_names(src: str) -> set[str]:
    """Names the test reads that are not builtins (called, or passed on as in `map(f, xs)`)."""
    return {n.id for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
            and n.id not in _NOT_PROGRAM}


def top_level_defs(program: str) -> set[str]:
    """Functions and classes the program defines at top level ({} when it does not parse)."""
    try:
        body = ast.parse(program).body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return set()
    return {n.name for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def module_bases(src: str) -> set[str]:
    """Standard-library modules the test uses only as `module.attr` (`math.isclose`): the judge imports
    them; bound to a recorder they would fail a correct program (the recorder has no `isclose`)."""
    tree = ast.parse(src)
    base_nodes = [n.value for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)]
    at_base = {id(n) for n in base_nodes}
    elsewhere = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in at_base}
    return {n.id for n in base_nodes if n.id not in elsewhere and n.id in sys.stdlib_module_names}


def mbpp_replay(src: str, setup: str, program: str = "") -> Replay:
    """An MBPP assert that is no plain call: every function it uses that neither the test nor the setup
    defines is the program's, under test. A test that calls none but builtins whose names the program
    defines at top level (MBPP's `max`, `sum`, `pow`) tests those: the builtin would otherwise do the
    work and any program would pass. A test that binds nothing of the program is refused."""
    own = defined_names(src, setup)
    modules = module_bases(src) - own
    names = sorted(used_names(src) - own - modules)
    if not names:
        names = sorted({n.func.id for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)
                        and isinstance(n.func, ast.Name) and n.func.id in _NOT_PROGRAM}
                       & top_level_defs(program) - own)
    refused = "" if names else "the test calls no function of the program, so it cannot judge one"
    imports = "".join(f"import {m}\n" for m in sorted(modules))
    return Replay(imports + src, "", tuple((n, n) for n in names), setup=setup, refused=refused)


def check_replay(test: str, entry: str, prompt: str) -> Replay:
    """A HumanEval check run whole: `check(<entry>)` with the entry point recorded. A function it calls
    that only the program defines (a helper of the prompt, when the prompt is not in the ground truth)
    is refused: judging by the program's own helper could be gamed (define `poly` to return 0).
    A prompt that is no Python (a problem statement in words) or defines no function or class is not
    the problem's code: it is ignored, and only a check that needs a helper is then refused."""
    if not top_level_defs(prompt):
        prompt = ""
    helpers = sorted(used_names(test) - defined_names(test, prompt) - {entry})
    refused = ""
    if helpers:
        refused = (f"the check uses {', '.join(helpers)}, which only the program defines; a program's own "
                   "helper cannot judge it (put the problem's code in the ground truth as 'prompt')")
    return Replay(test, f"check({entry})", ((entry, entry),), prompt=prompt, refused=refused)


@dataclass
class ReplayResult:
    passed: list[bool]
    reasons: list[str]
    runs: list[SandboxRun] = field(default_factory=list)  # the program's record runs (their statuses count)
    error: str = ""  # a judge run failed as a sandbox (not the program): the row is an error


def judge_request(r: Replay, mode: str, known: dict[str, str], nonce: str) -> str:
    return json.dumps({"mode": mode, "test": r.test, "run": r.run, "prompt": r.prompt, "setup": r.setup,
                       "bind": dict(r.bind), "known": known, "nonce": nonce})


def record_request(calls: Sequence[Sequence[str]], setup: str) -> str:
    return json.dumps({"kind": "record", "calls": [list(c) for c in calls], "setup": setup})


def parse_record(result: str, n: int) -> list[str]:
    """The harness's lines "<i>:<outcome>" as n outcomes; a call without a line had no result."""
    out = ["x:the program ended before this call returned"] * n
    for line in result.split("\n"):
        i, sep, rest = line.partition(":")
        if sep and i.isdigit() and int(i) < n and rest[:2] in ("v:", "e:", "x:"):
            out[int(i)] = rest
    return out


# What a harness without "record" requests says to one: the pre-issue-29 driver read an assert's "stmt",
# the current one names the kind it does not know.
_OLD_HARNESS = ("KeyError: 'stmt'", "unknown request kind")


def canonical_outcome(res: str) -> str:
    """A recorded outcome as the judge receives it: a value decoded here and written again canonically
    (`canon`, as the judge writes arguments), an exception's name checked, a reason trimmed. The program's
    raw text never reaches the judge; what cannot be read becomes "no result", with the reason."""
    tag, _, body = res.partition(":")
    if tag == "v":
        try:
            return "v:" + canon(parse_literal(body))
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as e:
            return "x:the program's result could not be read: " + str(e)[:200]
    if tag == "e":
        return "e:" + (body if body.isidentifier() and len(body) <= 100 else "Exception")
    return "x:" + " ".join(body.split())[:200]


def judge_output(t: TestRun, nonce: str) -> tuple[Optional[dict[str, Any]], str]:
    """The judge's JSON line, or why there is none. The verdict is the last line and carries the run's
    nonce: a line the test printed (perhaps a string the program returned) cannot stand in for it."""
    lines = [ln for ln in t.stdout.splitlines() if ln.strip()]
    try:
        out = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        out = None
    if t.status == "ok" and isinstance(out, dict) and out.get("nonce") == nonce:
        return out, ""
    tail = (t.stderr.strip().splitlines() or [f"exit code {t.returncode}"])[-1][:200]
    return None, f"judge {t.status}: {tail}"


class ReplayJudge:
    """Runs the three steps for the replay tests of one row; `first_run` is the row's one program run,
    which carries the call tests too (their path is unchanged)."""

    def __init__(self, sandbox: Sandbox, program: str, replays: Sequence[Replay]) -> None:
        self.sandbox, self.program, self.replays = sandbox, program, list(replays)
        self.judge_src = JUDGE.read_text(encoding="utf-8")
        self.known: list[dict[str, str]] = [{} for _ in replays]
        self.reasons = [r.refused for r in replays]
        self.over: set[int] = set()  # tests whose recorded results passed MAX_KNOWN_BYTES

    def _judge(self, mode: str, idx: list[int]) -> tuple[list[Optional[dict[str, Any]]], str]:
        if not idx:
            return [], ""
        nonce = secrets.token_hex(8)
        run = self.sandbox.run(self.judge_src, [judge_request(self.replays[i], mode, self.known[i], nonce)
                                                for i in idx])
        if run.error:
            return [], f"judge sandbox: {run.error}"
        outs = []
        for i, t in zip(idx, run.tests):
            out, why = judge_output(t, nonce)
            if out is None:
                self.reasons[i] = self.reasons[i] or why
            outs.append(out)
        return outs, ""

    def collect(self, idx: list[int]) -> tuple[dict[int, list[list[str]]], str]:
        """New calls per test (those whose results are not known yet)."""
        outs, err = self._judge("collect", idx)
        calls: dict[int, list[list[str]]] = {}
        for i, out in zip(idx, outs):
            if out is None:
                continue
            if out.get("error"):
                self.reasons[i] = self.reasons[i] or str(out["error"])
                continue
            calls[i] = [c for c in out["calls"] if "\n".join(c) not in self.known[i]]
        return calls, err

    def requests(self, calls: dict[int, list[list[str]]]) -> list[tuple[int, str]]:
        return [(i, record_request(c, self.replays[i].setup)) for i, c in calls.items() if c]

    def learn(self, calls: dict[int, list[list[str]]], sent: list[tuple[int, str]], tests: Sequence[TestRun]) -> None:
        for (i, _), t in zip(sent, tests):
            if t.status != "ok" and any(m in t.stderr for m in _OLD_HARNESS):
                self.over.add(i)
                self.reasons[i] = ("the sandbox's harness does not know 'record' requests (a sandbox server older "
                                   "than issue 29: protocol mismatch, update the server)")
                continue
            for c, res in zip(calls[i], parse_record(t.result, len(calls[i]))):
                self.known[i]["\n".join(c)] = canonical_outcome(res)
            if sum(len(k) + len(v) for k, v in self.known[i].items()) > MAX_KNOWN_BYTES:
                self.over.add(i)
                self.reasons[i] = (f"the program's results for this test exceed {MAX_KNOWN_BYTES >> 20} MiB, "
                                   "more than the judge is handed")

    def replay(self, idx: list[int]) -> tuple[dict[int, tuple[bool, bool]], str]:
        """(passed, met arguments never recorded) per test."""
        idx = [i for i in idx if i not in self.over]  # failed already, with their reason
        outs, err = self._judge("replay", idx)
        verdict = {}
        for i, out in zip(idx, outs):
            if out is not None:  # a pass needs one bound call replayed at least: else no program was judged
                ok = bool(out.get("passed")) and isinstance(out.get("calls"), int) and out["calls"] >= 1
                verdict[i] = (ok, bool(out.get("unrecorded")))
                self.reasons[i] = "" if ok else str(out.get("error") or "the test never called the program")
        return verdict, err


def run_rounds(judge: ReplayJudge, first_run: Any) -> ReplayResult:
    """The rounds of one row. `first_run(requests)` runs the program once with the call tests and these
    record requests, and returns (its SandboxRun, the TestRuns of the record requests)."""
    n = len(judge.replays)
    todo = [i for i in range(n) if not judge.reasons[i]]
    passed = [False] * n
    runs: list[SandboxRun] = []
    calls, err = judge.collect(todo) if todo else ({}, "")
    if err:
        return ReplayResult(passed, judge.reasons, runs, err)
    sent = judge.requests(calls)
    run, tests = first_run([r for _, r in sent])
    runs.append(run)
    if run.error:
        return ReplayResult(passed, judge.reasons, runs)
    judge.learn(calls, sent, tests)
    todo = [i for i in todo if i in calls]
    for rnd in range(MAX_ROUNDS):
        verdict, err = judge.replay(todo) if todo else ({}, "")
        if err:
            return ReplayResult(passed, judge.reasons, runs, err)
        for i, (ok, _) in verdict.items():
            passed[i] = ok
        todo = [i for i, (ok, more) in verdict.items() if more and not ok]
        if not todo or rnd == MAX_ROUNDS - 1 or any("timeout" in {t.status for t in r.tests} for r in runs):
            break
        calls, err = judge.collect(todo)
        if err:
            return ReplayResult(passed, judge.reasons, runs, err)
        sent = judge.requests(calls)
        if not sent:
            break
        extra = judge.sandbox.run(judge.program, [r for _, r in sent], driver=True)
        runs.append(extra)
        if extra.error:
            break
        judge.learn(calls, sent, extra.tests)
        todo = [i for i, _ in sent]
    return ReplayResult(passed, judge.reasons, runs)
