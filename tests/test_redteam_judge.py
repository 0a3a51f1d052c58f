"""Red team (issue 29, item 4): code tests that are no plain `call == literal` ("weak" forms: loops, `!=`,
ordering, helper expressions, `sorted(...)`, MBPP asserts with variables or `and`) were run inside the
judged program's process, where a wrong program could return an always-equal object, patch the builtins
the assert uses, or read the pass token from the driver's frame. Now every test form is judged outside:
the program only ever receives argument literals and returns literals; the test's comparisons run in a
judge process the program never ran in.

And item 8 (half): decoding a 1 MiB result must cost the trainer a small multiple of its size.

Each attack runs against the real local sandbox through CodeReward, as the trainer (venv interpreter) and
as an unprivileged runner (uid 1000, system interpreter), and a correct program must still score 1.0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from nemo_prorl.config.schema import RewardConfig, SandboxConfig
from nemo_prorl.rewards import RewardInput
from nemo_prorl.rewards.code import CodeReward, plan_tests
from nemo_prorl.confine.sandbox import _namespaces_available

pytestmark = pytest.mark.skipif(not _namespaces_available(), reason="this kernel forbids namespaces")

SYSTEM_PY = "/usr/bin/python3"
SETPRIV = shutil.which("setpriv")


def fenced(code: str) -> str:
    return f"<think>hmm</think>\n```python\n{textwrap.dedent(code)}\n```"


@pytest.fixture(scope="module", params=["trainer-venv", "uid1000-system"])
def reward(request):
    # generous wall-clock limits: a busy machine must not fail a correct program
    cfg = SandboxConfig(total_timeout_s=20.0, per_test_timeout_s=10.0, cpu_time_s=5, memory_mb=512,
                        max_file_bytes=4 << 20, num_workers=2, disk_mb=16,
                        max_output_bytes=1 << 18, max_run_output_bytes=1 << 20)
    if request.param.startswith("uid1000"):
        if os.getuid() != 0 or SETPRIV is None or not os.path.exists(SYSTEM_PY):
            pytest.skip("needs root, setpriv and /usr/bin/python3 to start the runner as another user")
        cfg.python = SYSTEM_PY
    r = CodeReward(RewardConfig(sandbox=cfg))
    if request.param.startswith("uid1000"):
        r.sandbox.runner_prefix = [SETPRIV, "--reuid", "1000", "--regid", "1000", "--clear-groups"]
    yield r
    r.close()


def score(reward, code: str, truth: dict):
    return reward.score(RewardInput(response=fenced(code), ground_truth=json.dumps(truth)))


def check(body: str, entry: str = "f", **extra) -> dict:
    return {"test": "def check(candidate):\n" + textwrap.indent(textwrap.dedent(body), "    "),
            "entry_point": entry, **extra}


# ---- the weak test forms, each with a correct program --------------------------------------------------

DOUBLE = "def f(x):\n    return 2 * x\n"
FORMS = {
    "loop_ne": (check("""
        for x, y in [(1, 2), (2, 4), (3, 6)]:
            if candidate(x) != y:
                raise AssertionError(x)
        """), DOUBLE),
    "ordering": (check("""
        x = 3
        assert candidate(x) < 7
        assert candidate(x) > 5
        """), DOUBLE),
    "helper_expression": (check("""
        for x in [0.5, 1.25]:
            assert abs(candidate(x) - 2 * x) < 1e-6
        """), DOUBLE),
    "sorted": (check("assert sorted(candidate([3, 1, 2])) == [1, 2, 3]\n"),
               "def f(xs):\n    return xs[::-1]\n"),
    "isclose_loop": (check("""
        import math
        for x in [1.0, 2.5]:
            assert math.isclose(candidate(x), x * 2, rel_tol=1e-9)
        """), DOUBLE),
    "exception_expected": (check("""
        assert candidate(2) == 4
        try:
            candidate(-1)
        except ValueError:
            pass
        else:
            raise AssertionError("no ValueError")
        """), "def f(x):\n    if x < 0:\n        raise ValueError(x)\n    return 2 * x\n"),
    "nested_call": (check("assert candidate(candidate(2)) == 8\n"), DOUBLE),
    "mbpp_set_variable": ({"test_list": ["res = f([1, 2, 2])\nassert set(res) == set([1, 2])",
                                         "assert f([3]) == [3]"]},
                          "def f(xs):\n    return sorted(set(xs))\n"),
    "mbpp_isclose_and": ({"test_list": ["import math\nassert math.isclose(f(2.0), 4.0, rel_tol=1e-3) "
                                        "and math.isclose(f(3.0), 6.0, rel_tol=1e-3)"]}, DOUBLE),
}
WRONG = {
    "loop_ne": "def f(x):\n    return 2 * x if x < 3 else 0\n",
    "ordering": "def f(x):\n    return 7\n",
    "helper_expression": "def f(x):\n    return x\n",
    "sorted": "def f(xs):\n    return xs[:2]\n",
    "isclose_loop": "def f(x):\n    return 2 * x + 1e-6\n",
    "exception_expected": DOUBLE,
    "nested_call": "def f(x):\n    return x + 2\n",
    "mbpp_set_variable": "def f(xs):\n    return [1]\n",
    "mbpp_isclose_and": "def f(x):\n    return 4.0\n",
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_golden_weak_forms_score_right(reward, form):
    truth, good = FORMS[form]
    ok = score(reward, good, truth)
    assert ok.reward == 1.0 and ok.status == "ok", ok
    bad = score(reward, WRONG[form], truth)
    assert bad.reward < 1.0 and not bad.correct, bad


def test_weak_forms_are_planned_for_judging_outside():
    """No weak form leaves a pass token to the program's process: each is judged by replay."""
    for form, (truth, good) in FORMS.items():
        plan = plan_tests(good, truth)
        assert "token" not in {c.cmp for c in plan.checks}, form
        assert all('"kind": "assert"' not in i for i in plan.inputs), form


# ---- attacks: wrong programs that scored 1.0 when weak tests ran inside the program --------------------

ALWAYS_EQUAL = """
import builtins, math
class Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __lt__(self, other): return True
    def __le__(self, other): return True
    def __gt__(self, other): return True
    def __ge__(self, other): return True
    def __hash__(self): return 0
    def __sub__(self, other): return self
    def __rsub__(self, other): return self
    def __abs__(self): return self
    def __bool__(self): return True
    def __iter__(self): return iter([self])
    def __len__(self): return 1
# the assert ran in this process: patch what it calls, too
builtins.sorted = lambda *a, **k: Anything()
builtins.set = lambda *a, **k: Anything()
builtins.abs = lambda *a, **k: Anything()
math.isclose = lambda *a, **k: True
def f(*a, **k):
    return Anything()
"""

FRAME_WALK = """
import gc, os, re, sys
def _leak():
    found = []
    fr = sys._getframe()
    while fr is not None:
        for v in list(fr.f_locals.values()) + list(fr.f_globals.values()):
            if isinstance(v, dict) and isinstance(v.get("token"), str):
                found.append(v["token"])
        fr = fr.f_back
    for o in gc.get_objects():
        if isinstance(o, dict) and isinstance(o.get("token"), str):
            found.append(o["token"])
        elif isinstance(o, str) and re.fullmatch(r"[0-9a-f]{32}", o):
            found.append(o)
    return found
def f(*a, **k):
    found = _leak()
    for t in found:
        print(t)
        os.write(3, t.encode())
    sys.stdout.flush()
    os._exit(0)
"""

OS_EXIT = """
import os, sys
def f(*a):
    print("ok")
    sys.stdout.flush()
    os._exit(0)
"""

SYS_EXIT = """
import sys
def f(*a):
    sys.exit(0)
"""

HUGE_DEEP = """
def f(*a):
    x = []
    for _ in range(100000):
        x = [x]
    return x
"""

HUGE_WIDE = """
def f(*a):
    return [[[]] * 1000] * 2000
"""

ATTACKS = {"always_equal": ALWAYS_EQUAL, "frame_walk": FRAME_WALK, "os_exit": OS_EXIT,
           "sys_exit": SYS_EXIT, "huge_deep": HUGE_DEEP, "huge_wide": HUGE_WIDE}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("form", ["loop_ne", "ordering", "helper_expression", "sorted", "isclose_loop",
                                  "mbpp_set_variable", "mbpp_isclose_and"])
def test_attacks_on_weak_forms_score_zero(reward, attack, form):
    truth, good = FORMS[form]
    res = score(reward, ATTACKS[attack], truth)
    assert res.reward == 0.0 and not res.correct, res
    assert score(reward, good, truth).reward == 1.0  # the pool still serves a correct program


EXIT_MIDWAY = """
import os
calls = 0
def f(x):
    global calls
    calls += 1
    if calls == 2:
        os._exit(0)  # the calls after this one have no result
    return 2 * x
"""


@pytest.mark.parametrize("form", ["loop_ne", "helper_expression", "isclose_loop"])
def test_ending_the_process_midway_fails_the_calls_left(reward, form):
    res = score(reward, EXIT_MIDWAY, FORMS[form][0])
    assert res.reward == 0.0 and "ended before" in res.reason, res


def test_the_program_never_receives_the_test_code(reward):
    """The program sees argument literals only: no test source, no expected values, no token. (It builds
    the words it looks for at run time: its own constants would otherwise be found.)"""
    code = ("import sys, os, gc\nseen = []\ndef f(*a):\n    blob = repr([a, sys.argv, os.listdir('/sbx')])\n"
            "    blob += ''.join(open('/sbx/' + n).read() for n in os.listdir('/sbx'))\n"
            "    blob += repr([o for o in gc.get_objects() if isinstance(o, (str, dict))])\n"
            "    fr = sys._getframe()\n    while fr is not None:\n"
            "        blob += repr(fr.f_locals)\n        fr = fr.f_back\n"
            "    return any(''.join(w) in blob for w in (('SECRET-', 'EXPECTED'), ('def ', 'check(')))\n")
    truth = check("""
        for x in [1, 2]:
            assert candidate(x) is False or x == 'SECRET-EXPECTED'
        """)
    assert score(reward, code, truth).reward == 1.0  # f returned False: the secret was nowhere in reach


# ---- forms the judge cannot carry: a clear reason, never a silent 1.0 ----------------------------------

def test_a_class_argument_is_a_reasoned_failure(reward):
    truth = {"test_list": ["assert f(Node(1)) == 1"]}
    code = "class Node:\n    def __init__(self, v):\n        self.v = v\ndef f(n):\n    return n.v\n"
    res = score(reward, code, truth)
    assert res.reward == 0.0 and "plain" in res.reason, res


def test_a_program_helper_in_check_is_a_reasoned_failure(reward):
    """HumanEval/32 style: the check uses `poly`, which only the program defines; judging by the
    program's own helper could be gamed (define poly to return 0), so it is refused, by name."""
    truth = check("assert abs(poly([1, 2], candidate([1, 2]))) < 1e-6\n")
    code = "def poly(xs, x):\n    return 0\ndef f(xs):\n    return 123\n"
    res = score(reward, code, truth)
    assert res.reward == 0.0 and "poly" in res.reason, res


def test_a_helper_from_the_prompt_is_trusted(reward):
    """With the problem's prompt in the ground truth, its helpers are the dataset's, not the program's."""
    prompt = "def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n"
    truth = check("assert abs(poly([1, 2], candidate([1, 2]))) < 1e-6\n", prompt=prompt)
    assert score(reward, "def poly(xs, x):\n    return 0\ndef f(xs):\n    return 123\n", truth).reward == 0.0
    assert score(reward, prompt + "def f(xs):\n    return -xs[0] / xs[1]\n", truth).reward == 1.0


# ---- item 8: decoding a result costs a small multiple of its size -------------------------------------

DECODE_PROBE = r"""
import sys, tracemalloc
from nemo_prorl.rewards.code import _decode
kind = sys.argv[1]
n = 1 << 20
unit = {"lists": "[], ", "nested": "[", "escaped": "", "floats": "0.5, ", "strs": "'a', ", "ints": "1, "}[kind]
if kind == "nested":
    blob = "[" * (n // 2) + "]" * (n // 2)
elif kind == "escaped":  # one string of escapes: a regular expression for it kept 100x its size
    blob = repr("\x00\n" * (n // 8))
else:
    blob = "[" + unit * ((n - 2) // len(unit)) + "]"
tracemalloc.start()
try:
    _decode(blob)
    outcome = "decoded"
except Exception as e:
    outcome = type(e).__name__
peak = tracemalloc.get_traced_memory()[1]
print(outcome, peak / len(blob))
"""


@pytest.mark.parametrize("kind", ["lists", "nested", "escaped", "floats", "strs", "ints"])
def test_decoding_a_1mib_result_costs_a_small_multiple(kind):
    out = subprocess.run([sys.executable, "-c", DECODE_PROBE, kind], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    outcome, ratio = out.stdout.split()
    assert outcome in ("decoded", "ValueError"), out.stdout  # refused with a reason, never a crash
    assert float(ratio) < 20, f"{kind}: peak {float(ratio):.1f}x the result's size"


def test_a_result_over_the_cap_fails_with_its_reason(reward):
    """A forged result nested past the harness's own depth limit is refused before it is parsed."""
    code = 'import os\ndef f(x):\n    os.write(3, b"[" * 5000 + b"]" * 5000)\n    os._exit(0)\n'
    res = score(reward, code, {"fn_name": "f", "inputs": [[1]], "outputs": [[]]})
    assert res.reward == 0.0 and "nested" in res.reason, res


def test_parse_literal_reads_what_the_harness_writes_as_literal_eval_does():
    """Call tests keep their judging: on every value the harness encodes, the new decoder returns what
    `ast.literal_eval` returned; anything else is refused with a reason, never evaluated."""
    import ast
    import random

    from nemo_prorl.confine.driver import encode
    from nemo_prorl.rewards.sandbox_judge import parse_literal

    rng = random.Random(29)
    atoms = [0, -3, 10 ** 30, -2 ** 70, 1.5, -0.0, 1e300, 3e-310, float("inf"), float("-inf"), True, False,
             None, "a", "it's", "q\"'", "x\ny\\", "\u00e9\u2028\x00", b"", b"a\x00'", 1j, 1 + 2j, -1 - 0j, ""]

    def gen(depth=0):
        if depth > 3 or rng.random() < 0.5:
            return rng.choice(atoms)
        items = [gen(depth + 1) for _ in range(rng.randrange(4))]
        kind = rng.randrange(5)
        if kind == 2:
            try:
                return set(items)
            except TypeError:
                return items
        return [items, tuple(items), items, {str(i): x for i, x in enumerate(items)},
                {i: x for i, x in enumerate(items)}][kind]

    for _ in range(3000):
        text = encode(gen())
        want, got = ast.literal_eval(text), parse_literal(text)
        assert repr(got) == repr(want) and type(got) is type(want), text
    deepest = "[" * 101 + "]" * 101  # the harness writes at most this deep
    assert parse_literal(deepest) == ast.literal_eval(deepest)
    for bad in ["", "[1 2]", "(1)", "{1: 2, 3}", "__import__('os')", "[" * 102 + "]" * 102, "'open", "1 2"]:
        with pytest.raises(ValueError):
            parse_literal(bad)


def test_a_verdict_line_without_the_runs_nonce_is_no_verdict():
    from nemo_prorl.rewards.code_judge import judge_output
    from nemo_prorl.confine.sandbox import TestRun

    forged = TestRun("ok", 0, stdout='{"passed": true, "error": "", "unrecorded": false}\n')
    assert judge_output(forged, "n1")[0] is None
    real = TestRun("ok", 0, stdout='{"passed": true, "error": "", "unrecorded": false, "nonce": "n1"}\n')
    assert judge_output(real, "n1")[0]["passed"] is True


def test_a_function_passed_on_is_recorded_too(reward):
    truth = {"test_list": ["assert list(map(f, [1, 2])) == [2, 4]\nassert f(3) != 5"]}
    assert score(reward, DOUBLE, truth).reward == 1.0
    assert score(reward, ALWAYS_EQUAL, truth).reward == 0.0


def test_a_call_without_result_fails_even_under_a_bare_except(reward):
    truth = check("""
        try:
            r = candidate(1)
        except:  # noqa: E722
            r = 2
        assert r == 2
        """)
    assert score(reward, "import os\ndef f(x):\n    os._exit(0)\n", truth).reward == 0.0
    assert score(reward, DOUBLE, truth).reward == 1.0


# ---- review of item 4: defects of the replay judge ---------------------------------------------------

def _judge_direct(code: str, truth: dict, program_results: dict) -> dict:
    """The judge's collect and replay (sandbox_judge.run), in this process, with the program's recorded
    results given as {key: outcome}: a unit-level view of one replay test."""
    from nemo_prorl.rewards.sandbox_judge import run as judge_run

    r = plan_tests(code, truth).replays[0]
    req = {"test": r.test, "run": r.run, "prompt": r.prompt, "setup": r.setup, "bind": dict(r.bind),
           "refused": r.refused}
    out = judge_run({**req, "mode": "collect", "known": {}})
    known = {"\n".join(c): program_results.get(c[1], "x:not given") for c in out["calls"]}
    return judge_run({**req, "mode": "replay", "known": known})


@pytest.mark.parametrize("name", ["max", "sum", "pow"])
def test_a_function_named_like_a_builtin_is_the_programs(reward, name):
    """MBPP functions named like builtins: the test must call the program's, never the builtin (which
    did the work, so any program scored 1.0)."""
    body = {"max": "return a if a > b else b", "sum": "return a + b", "pow": "return a ** b"}[name]
    want = {"max": 5, "sum": 8, "pow": 243}[name]
    truth = {"test_list": [f"assert {name}(3, 5) == {want}"]}
    bad = score(reward, f"def {name}(a, b):\n    return 'wrong'\n", truth)
    assert bad.reward == 0.0, bad
    assert score(reward, f"def {name}(a, b):\n    {body}\n", truth).reward == 1.0
    # a program that defines nothing of that name cannot pass by the builtin either
    assert score(reward, "def g(a, b):\n    return 0\n", truth).reward == 0.0


def test_a_replay_that_calls_no_program_function_fails():
    """A test that binds no program name (or never calls the program) proves nothing about it."""
    out = _judge_direct("def g(): pass\n", {"test_list": ["x = [3, 5]\nassert max(x) == 5"]}, {})
    assert out["passed"] is False and "program" in out["error"], out


def test_the_call_limit_is_noted_under_a_bare_except():
    truth = check("""
        while True:
            try:
                if candidate(1) == 'stop':
                    break
            except:  # noqa: E722
                break
        """)
    out = _judge_direct("def f(x):\n    return 'go'\n", truth, {"[1]": "v:'go'"})
    assert out["passed"] is False and "calls" in out["error"], out


@pytest.mark.parametrize("exc", ["StopIteration", "StopAsyncIteration", "GeneratorExit"])
def test_a_recorded_stop_iteration_does_not_pass_all_map(exc):
    truth = {"test_list": ["assert all(map(f, [1, 2, 3]))\nassert not any(map(g, [1, 2]))"]}
    code = "def f(x):\n    raise StopIteration\ndef g(x):\n    raise StopIteration\n"
    res = {f"[{i}]": f"e:{exc}" for i in (1, 2, 3)}
    out = _judge_direct(code, truth, res)
    assert out["passed"] is False, out


NEAR_CAP = {  # units the harness writes, repeated to just under 1 MiB of output (max_output_bytes)
    "singleton_lists": "[5], ", "pairs": "(1, 2), ", "empty_lists": "[], ", "empty_dicts": "{}, ",
    "empty_sets": "set(), ", "bools": "True, ", "set_dicts": "{0: set()}, ", "empty_tuples": "(), ",
    "chars": "'a', ", "tuple_sets": "(set(),), ", "list_sets": "[set()], ",
}


@pytest.mark.parametrize("unit", sorted(NEAR_CAP))
def test_parse_literal_accepts_what_literal_eval_did_near_the_cap(unit):
    """Plain call tests are judged as before: a result the harness can write within max_output_bytes
    (1 MiB) and `ast.literal_eval` read is read, with the same value."""
    import ast

    from nemo_prorl.rewards.sandbox_judge import parse_literal

    u = NEAR_CAP[unit]
    n = ((1 << 20) - 2) // len(u)
    text = "[" + u * n + "]"
    # what literal_eval returns for this text, built without its syntax tree (about 270x the text)
    assert parse_literal(text) == [ast.literal_eval(u.rstrip(", "))] * n


def test_a_natural_language_prompt_is_ignored(reward):
    truth = check("for x in [1, 2]:\n    assert candidate(x) == 2 * x\n",
                  prompt="Write a function that doubles its argument.")
    assert score(reward, DOUBLE, truth).reward == 1.0
    assert score(reward, "def f(x):\n    return x\n", truth).reward == 0.0
    helper = check("assert poly([1], candidate(1)) == 1\n", prompt="Use poly as defined.")
    res = score(reward, "def poly(xs, x):\n    return 1\ndef f(x):\n    return 0\n", helper)
    assert res.reward == 0.0 and "poly" in res.reason, res


def test_a_module_used_by_an_mbpp_test_is_imported_not_bound(reward):
    truth = {"test_list": ["assert math.isclose(f(2)[0], 4.0) and f(2)[1] == 'x'"],
             "test_setup_code": "import math"}
    assert score(reward, "def f(x):\n    return [2.0 * x, 'x']\n", truth).reward == 1.0
    assert score(reward, "def f(x):\n    return [5.0, 'x']\n", truth).reward == 0.0
    plain = {"test_list": ["assert math.isclose(f(2)[0], 4.0)"]}  # no setup: the judge imports math
    assert score(reward, "def f(x):\n    return [2.0 * x]\n", plain).reward == 1.0


def test_an_argument_the_harness_cannot_read_is_no_program_exception():
    from nemo_prorl.confine import driver

    line = driver.record({"f": lambda *a: 1}, "f", "[1, ", "{}")
    assert line.startswith("x:") and "argument" in line, line


def test_recorded_results_reach_the_judge_canonical_and_capped():
    """The program's raw result text never reaches the judge: each value is decoded and written again
    canonically; a test whose results pass MAX_KNOWN_BYTES fails with that reason."""
    from nemo_prorl.rewards.code_judge import MAX_KNOWN_BYTES, ReplayJudge, canonical_outcome, mbpp_replay
    from nemo_prorl.confine.sandbox import TestRun

    assert canonical_outcome("v:{2,1}") == "v:{1, 2}"
    assert canonical_outcome("v:__import__('os')").startswith("x:")
    assert canonical_outcome("e:Not A Name") == "e:Exception"
    rj = ReplayJudge(None, "def f(x): pass", [mbpp_replay("assert f(1) != f(2)", "")])
    big = "'" + "a" * (1 << 20) + "'"
    calls = {0: [["f", f"[{i}]", "{}"] for i in range(MAX_KNOWN_BYTES >> 20)]}
    lines = "\n".join(f"{i}:v:{big}" for i in range(len(calls[0])))
    rj.learn(calls, [(0, "")], [TestRun("ok", 0, result=lines)])
    assert 0 in rj.over and "exceed" in rj.reasons[0], rj.reasons
    assert rj.replay([0]) == ({}, "")  # never handed to the judge


def test_the_worker_timeout_covers_every_sandbox_run_of_a_replay_row():
    """A code row with replay tests runs the sandbox up to SANDBOX_RUNS_PER_ROW times (program record runs,
    judge collects and replays), each up to total_timeout_s: the derived worker timeout must cover that."""
    from nemo_prorl.cluster.rewards import derived_worker_timeout
    from nemo_prorl.rewards.code_judge import MAX_ROUNDS, SANDBOX_RUNS_PER_ROW

    assert SANDBOX_RUNS_PER_ROW >= 3 * MAX_ROUNDS
    r = RewardConfig()
    extra = derived_worker_timeout(r, ["code"] * 100) - derived_worker_timeout(r, [])
    assert extra >= 100 * SANDBOX_RUNS_PER_ROW * r.sandbox.total_timeout_s / r.sandbox.num_workers


def test_a_harness_without_record_requests_is_named_a_protocol_mismatch():
    """A sandbox server older than the replay judge answers a record request with its own error: the
    reason must say so, not blame the program."""
    from nemo_prorl.rewards.code_judge import ReplayJudge, mbpp_replay
    from nemo_prorl.confine.sandbox import TestRun

    rj = ReplayJudge(None, "def f(x): pass", [mbpp_replay("assert f(1) != f(2)", "")])
    old = TestRun("error", 1, stderr="Traceback (most recent call last):\nKeyError: 'stmt'\n")
    rj.learn({0: [["f", "[1]", "{}"]]}, [(0, "")], [old])
    assert "protocol mismatch" in rj.reasons[0], rj.reasons


@pytest.mark.parametrize("raise_, caught", [
    ("class Bad(ValueError):\n    pass\ndef f(x):\n    if x < 0:\n        raise Bad(x)\n    return 2 * x\n", "ValueError"),
    ("def f(x):\n    if x < 0:\n        b'\\xff'.decode()\n    return 2 * x\n", "UnicodeDecodeError"),
])
def test_an_exception_is_caught_by_its_builtin_ancestor(reward, raise_, caught):
    """The program's own exception class reaches the judge as its nearest builtin base; an exception that
    takes several arguments (UnicodeDecodeError) is rebuilt all the same."""
    truth = check(f"""
        assert candidate(2) == 4
        try:
            candidate(-1)
        except {caught}:
            pass
        else:
            raise AssertionError("no {caught}")
        """)
    res = score(reward, raise_, truth)
    assert res.reward == 1.0, res
    assert score(reward, DOUBLE, truth).reward == 0.0


def test_set_of_str_order_is_the_same_in_every_judge_run(reward):
    """Calls whose arguments depend on earlier results, in the order of a set of strings: each judge run
    (collect, then replay, round after round) must iterate it in the same order (a fixed hash seed)."""
    truth = check("""
        acc = []
        for s in {"ant", "bee", "cat", "dog"}:
            acc = candidate(acc, s)
        assert sorted(acc) == ["ant", "bee", "cat", "dog"]
        """)
    res = score(reward, "def f(acc, s):\n    return acc + [s]\n", truth)
    assert res.reward == 1.0, res
