"""The code sandbox against hostile programs: each must be contained, scored 0 with a reason, and the
pool must keep serving afterwards."""

import json
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from nemo_prorl.config.schema import RewardConfig, SandboxConfig
from nemo_prorl.rewards import RewardInput
from nemo_prorl.rewards.code import CodeReward, outputs_match, plan_tests
from nemo_prorl.confine.sandbox import LocalSandbox, _namespaces_available

needs_ns = pytest.mark.skipif(not _namespaces_available(), reason="this kernel forbids user/net/pid namespaces")

# stdin/stdout problem: print the sum of two integers
TESTS = json.dumps({"inputs": ["1 2\n", "10 -3\n", "0 0\n"], "outputs": ["3\n", "7\n", "0\n"]})
GOOD = "a, b = map(int, input().split())\nprint(a + b)\n"


def fenced(code: str) -> str:
    return f"<think>let me write it</think>\n```python\n{code}\n```"


@pytest.fixture(scope="module")
def reward():
    cfg = RewardConfig(sandbox=SandboxConfig(total_timeout_s=3.0, per_test_timeout_s=3.0, cpu_time_s=3,
                                             memory_mb=512, max_file_bytes=4 << 20, num_workers=2))
    r = CodeReward(cfg)
    yield r
    r.close()


def _score(reward, code, tests=TESTS):
    return reward.score(RewardInput(response=fenced(code), ground_truth=tests))


def _still_serves(reward) -> bool:
    """A correct program still scores 1 on this sandbox. The fixture's 3 s wall-clock limits end hostile
    programs quickly; here they are generous, so that a busy machine (slow interpreter starts) cannot fail
    the check."""
    import dataclasses

    tight = reward.sandbox.cfg
    reward.sandbox.cfg = dataclasses.replace(tight, total_timeout_s=300.0, per_test_timeout_s=100.0)
    try:
        return _score(reward, GOOD).reward == 1.0
    finally:
        reward.sandbox.cfg = tight


def _uid(p: Path) -> int:
    try:
        return p.stat().st_uid
    except OSError:
        return -1


def _host_processes_with(token: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if token.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def test_correct_program_scores_one_and_tempdirs_are_removed(reward):
    before = set(Path(tempfile.gettempdir()).glob("prorl-sbx-*"))
    res = _score(reward, GOOD)
    assert (res.reward, res.correct, res.status) == (1.0, True, "ok")
    assert res.info["tests_passed"] == 1.0
    assert set(Path(tempfile.gettempdir()).glob("prorl-sbx-*")) <= before


def test_partial_credit_is_the_fraction_of_tests_passed(reward):
    res = _score(reward, "a, b = map(int, input().split())\nprint(a + b if a else 99)\n")
    assert res.reward == pytest.approx(2 / 3) and res.correct is False


def test_syntax_error_and_missing_code_score_zero(reward):
    assert _score(reward, "def f(:\n").reason.startswith("syntax error")
    res = reward.score(RewardInput(response="no code here", ground_truth=TESTS))
    assert res.reward == 0 and res.reason == "no fenced code block" and res.status == "ok"


def test_bad_ground_truth_is_a_verifier_error_not_a_wrong_answer(reward):
    res = reward.score(RewardInput(response=fenced(GOOD), ground_truth="{not json"))
    assert res.status == "error" and "not JSON" in res.reason
    res = reward.score(RewardInput(response=fenced(GOOD), ground_truth=json.dumps({"inputs": ["1"]})))
    assert res.status == "error" and "unknown test format" in res.reason


HOSTILE = {
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "memory_bomb": "x = bytearray(8 << 30)\nprint(len(x))\n",
    "growing_memory": "x = []\nwhile True:\n    x.append(' ' * (1 << 20))\n",
    "infinite_loop": "while True:\n    pass\n",
    "network": "import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=2)\nprint(3)\n",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(-1, signal.SIGKILL)\nprint(3)\n",
    "gigabytes_of_output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
}


@needs_ns
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained_and_scored_zero(reward, name):
    res = _score(reward, HOSTILE[name])
    assert res.reward == 0.0 and res.correct is False, res
    # the program's failure, with a reason; not a verifier error (nor the runner's outer time limit)
    assert res.status == "ok" and res.reason, res
    if os.getuid() == 0:  # programs ran under uids of this sandbox's own: none of their processes may be left
        assert reward.sandbox.uids_used
        time.sleep(0.1)
        assert [p for p in Path("/proc").iterdir() if p.name.isdigit() and _uid(p) in reward.sandbox.uids_used] == []
    assert _still_serves(reward)  # we are alive and the pool keeps serving


@needs_ns
def test_hostile_reasons_name_the_limit(reward):
    assert "time limit" in _score(reward, HOSTILE["infinite_loop"]).reason
    assert "MemoryError" in _score(reward, HOSTILE["memory_bomb"]).reason
    assert "unreachable" in _score(reward, HOSTILE["network"]).reason
    assert "output_limit" in _score(reward, HOSTILE["gigabytes_of_output"]).reason


@needs_ns
def test_sleeping_children_do_not_outlive_the_run(reward):
    token = f"prorl_sleeper_{secrets.token_hex(4)}"
    code = ("import os, subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{token}'], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    import time; time.sleep(60)\n"
            "a, b = map(int, input().split())\nprint(a + b)\n")
    res = _score(reward, code)
    assert res.reward == 1.0  # the answer was right; the children are simply killed
    time.sleep(0.2)
    assert _host_processes_with(token) == []


@needs_ns
def test_program_cannot_read_the_trainers_environment_or_files(reward, tmp_path, monkeypatch):
    secret = f"s3cret-{secrets.token_hex(6)}"
    monkeypatch.setenv("PRORL_TEST_SECRET", secret)
    project_file = Path(__file__).resolve()
    home_file = Path.home() / ".prorl_sandbox_probe"
    home_file.write_text(secret)
    try:
        code = ("import os, glob\nout = [repr(dict(os.environ))]\n"
                "for p in glob.glob('/proc/*/environ') + "
                f"[{str(project_file)!r}, {str(home_file)!r}, {str(tmp_path)!r} + '/x']:\n"
                "    try:\n        out.append(open(p, 'rb').read().decode('latin1'))\n"
                "    except OSError as e:\n        out.append(type(e).__name__)\n"
                "print(' '.join(out))\n")
        run = reward.sandbox.run(code, [""])
        out = run.tests[0].stdout
        assert run.tests[0].status == "ok" and out
        assert secret not in out and "PRORL_TEST_SECRET" not in out
        assert "test_program_cannot_read" not in out  # this very file is not readable
    finally:
        home_file.unlink()


@needs_ns
def test_program_cannot_write_outside_its_own_folder(reward):
    """/w (and /tmp, a link to it) is the only writable place, and it is gone after the run."""
    target = Path(tempfile.gettempdir()) / f"prorl_escape_{secrets.token_hex(4)}"
    code = (f"for p in ['/var/tmp/prorl_escape', {str(Path.cwd() / 'escape.txt')!r}, '/usr/escape', '/escape', "
            f"'/sbx/escape', {str(target)!r}, 'ok.txt']:\n"
            "    try:\n        open(p, 'w').write('x')\n        print('wrote', p)\n"
            "    except OSError as e:\n        print('denied', p)\n")
    out = reward.sandbox.run(code, [""]).tests[0].stdout
    assert not target.exists() and not (Path.cwd() / "escape.txt").exists()
    assert not Path("/var/tmp/prorl_escape").exists() and not Path("/usr/escape").exists()
    assert "wrote ok.txt" in out and f"wrote {target}" in out and out.count("wrote") == 2, out


def test_many_programs_run_concurrently(reward):
    """Two programs of a batch run at the same time (the pool has 2 workers): each one's first test writes
    when it started and the last test when it ended, and the intervals overlap. No wall-clock budget."""
    stamp = "import sys, time\nprint(time.time(), file=sys.stderr)\ntime.sleep(0.3)\n"
    rows = [RewardInput(response=fenced(stamp + GOOD), ground_truth=TESTS)] * 4
    runs = []
    real = reward.sandbox.run

    def run(code, inputs, driver=False):
        out = real(code, inputs, driver)
        runs.append([float(t.stderr.split()[0]) for t in out.tests])
        return out

    reward.sandbox.run = run
    try:
        results = reward.score_batch(rows)
    finally:
        reward.sandbox.run = real
    assert [r.reward for r in results] == [1.0] * 4 and len(runs) == 4
    spans = sorted((min(ts), max(ts) + 0.3) for ts in runs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans  # serial runs would not overlap


def test_without_namespaces_the_sandbox_refuses_unless_allowed(monkeypatch, caplog):
    """Issue 18: a machine that cannot confine (no namespaces) used to drop silently to rlimits only."""
    from nemo_prorl.confine import sandbox as sandbox_mod

    monkeypatch.setattr(sandbox_mod, "_namespaces_available", lambda: False)
    monkeypatch.setattr(sandbox_mod, "_warned_unconfined", False)
    with pytest.raises(sandbox_mod.UnconfinedError, match="allow_unconfined"):
        LocalSandbox(SandboxConfig())
    with pytest.raises(sandbox_mod.UnconfinedError):  # the reward is built at launch, not per row
        CodeReward(RewardConfig(sandbox=SandboxConfig()))
    caplog.set_level("WARNING")
    py = "/usr/bin/python3" if os.getuid() == 0 else ""  # as root: one that the sandbox uid can run
    sb = LocalSandbox(SandboxConfig(total_timeout_s=2.0, per_test_timeout_s=1.0, allow_unconfined=True, python=py))
    LocalSandbox(SandboxConfig(allow_unconfined=True, python=py))
    assert sum("allow_unconfined" in r.message for r in caplog.records) == 1  # warned once per run
    run = sb.run("print(input()[::-1])", ["abc\n", "xy\n"])
    assert [t.stdout for t in run.tests] == ["cba\n", "yx\n"]
    run = sb.run("while True: pass", [""])
    assert run.tests[0].status == "timeout"


@pytest.mark.skipif(os.getuid() != 0, reason="about a trainer running as root")
def test_unconfined_as_root_never_runs_programs_as_root(monkeypatch, tmp_path):
    """Review finding: with an interpreter that the sandbox uid cannot reach, the unconfined runner fell
    back to running programs as root. Now the sandbox refuses at launch, and the runner refuses too."""
    import shutil

    from nemo_prorl.confine import sandbox as sandbox_mod

    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    py = closed / "python3"
    shutil.copy(sys._base_executable, py)
    monkeypatch.setattr(sandbox_mod, "_namespaces_available", lambda: False)
    with pytest.raises(sandbox_mod.UnconfinedError, match="reward.sandbox.python"):
        LocalSandbox(SandboxConfig(allow_unconfined=True, python=str(py)))
    sb = LocalSandbox(SandboxConfig(allow_unconfined=True, python="/usr/bin/python3"))
    sb.python = str(py)  # past the launch check: the runner itself refuses
    run = sb.run("import os\nprint(os.getuid())", [""])
    assert run.tests == [] and "not reachable by an unprivileged uid" in run.error, run


@pytest.mark.parametrize("truth,code,expected", [
    ({"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, [7]]}, "def add(a, b):\n    return a + b", 1.0),
    ({"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 8]}, "def add(a, b):\n    return a + b", 0.5),
    ({"fn_name": "pair", "inputs": [[1], [2]], "outputs": [[[1, 2]], [2, 3]]},  # a tuple is a JSON list here
     "def pair(a):\n    return (a, a + 1)", 1.0),
    ({"fn_name": "twoSum", "inputs": [[[2, 7], 9]], "outputs": [[0, 1]]},
     "class Solution:\n    def twoSum(self, nums, t):\n        return [0, 1]", 1.0),
    ({"test_list": ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(0) == 1"]}, "def sq(x):\n    return x * x", 2 / 3),
    ({"test": "def check(candidate):\n    assert candidate(2) == 4", "entry_point": "sq"}, "def sq(x):\n    return x * x", 1.0),
    ({"test": "def check(candidate):\n    assert candidate(2) == 5", "entry_point": "sq"}, "def sq(x):\n    return x * x", 0.0),
    ({"inputs": [["1 2"]], "outputs": [["3"]]}, GOOD, 1.0),  # TACO stores line lists
])
def test_test_case_formats(reward, truth, code, expected):
    assert _score(reward, code, json.dumps(truth)).reward == pytest.approx(expected)


def test_exiting_early_does_not_pass_assert_tests(reward):
    truth = json.dumps({"test_list": ["assert f() == 1"]})
    assert _score(reward, "import sys\nsys.exit(0)\ndef f():\n    return 2", truth).reward == 0.0


@pytest.mark.parametrize("got,exp,ok", [
    ("3\n", "3", True), ("3  \n\n", "3\n", True), ("1 2\n3", "1 2 3", True), ("0.3333333", "0.33333333", True),
    ("0.33", "0.34", False), ("3", "4", False), ("1000000001", "1000000000", False), ("1_000", "1000", False),
    ("3.0000000001", "3", False), ("1 2", "1 2 3", False), ("YES", "yes", False),
])
def test_output_comparison(got, exp, ok):
    assert outputs_match(got, exp) is ok


def test_plan_tests_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="equal length"):
        plan_tests("", {"inputs": ["1"], "outputs": []})


def test_two_trainers_on_one_node_get_disjoint_sandbox_uids(tmp_path, monkeypatch):
    """Issue 18: RLIMIT_NPROC counts per uid, so trainers that shared sandbox uids shared one process limit.
    Each process claims a block of uids under an exclusive lock held while it lives."""
    import subprocess
    import sys

    from nemo_prorl.confine.sandbox import UidBlock

    monkeypatch.setattr(UidBlock, "LOCK_DIR", str(tmp_path / "uids"))
    code = ("import sys\nfrom nemo_prorl.confine.sandbox import UidBlock\n"
            f"UidBlock.LOCK_DIR = {str(tmp_path / 'uids')!r}\n"
            "b = UidBlock()\nu = [b.take(), b.take()]\nprint(u[0], u[1], flush=True)\nsys.stdin.read()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        taken = [set(map(int, p.stdout.readline().split())) for p in procs]
        mine = UidBlock()
        here = {mine.take() for _ in range(3)}
    finally:
        for p in procs:
            p.communicate("")
    assert all(len(t) == 2 for t in taken) and len(here) == 3  # concurrent programs: a uid each
    assert not (taken[0] & taken[1]) and not (here & (taken[0] | taken[1]))
    blocks = [{u // UidBlock.SIZE for u in t} for t in (*taken, here)]
    assert len(set().union(*blocks)) == 3  # three processes, three blocks
