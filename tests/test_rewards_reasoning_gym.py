"""Reasoning Gym: every task the package ships is scored by its own score_answer through our reward."""

import json
import sys

import pytest
import reasoning_gym
from reasoning_gym.factory import DATASETS

from nemo_prorl.rewards import RewardInput
from nemo_prorl.rewards.reasoning_gym import ReasoningGymReward

# Tasks whose entries have no single oracle answer: the scorer checks a proposed solution. Where the
# entry's metadata holds a valid solution we submit it; boxnet and rush_hour ship none.
SOLUTION_IN_METADATA = {
    "graph_color": lambda m: json.dumps({str(k): v for k, v in m["possible_answer"].items()}),
    "propositional_logic": lambda m: m["example_answer"],
    "rubiks_cube": lambda m: m["example_correct_answer"],
}
NO_REFERENCE_SOLUTION = {"boxnet", "rush_hour"}
TASKS = sorted(set(DATASETS) - {"composite"})  # composite mixes other tasks; tested below


@pytest.fixture(scope="module")
def reward():
    r = ReasoningGymReward()
    yield r
    r.close()


def row(entry, task, answer_text, *, config=None, json_metadata=False):
    meta = entry["metadata"]
    if json_metadata:  # what a JSONL data file gives back: tuples become lists, int keys strings
        meta = json.loads(json.dumps(meta, default=str))
    rg = {"task": task, "entry_metadata": meta}
    if config is not None:
        rg["config"] = config
    truth = "" if entry["answer"] is None else str(entry["answer"])
    return RewardInput(response=f"<think>working</think>The result: <answer>{answer_text}</answer>",
                       ground_truth=truth, prompt=entry["question"], metadata={"reasoning_gym": rg})


@pytest.mark.parametrize("task", TASKS)
def test_every_task_scores_its_own_answer_one_and_a_wrong_answer_less(reward, task):
    config = {"seed": 3, "size": 2}
    entry = reasoning_gym.create_dataset(task, **config)[1]
    wrong = reward.score(row(entry, task, "zzz_not_an_answer", config=config, json_metadata=True))
    assert wrong.status == "ok" and wrong.reward < 1.0 and wrong.correct is False, wrong
    if task in NO_REFERENCE_SOLUTION:
        assert entry["answer"] is None
        return
    answer = SOLUTION_IN_METADATA[task](entry["metadata"]) if task in SOLUTION_IN_METADATA else entry["answer"]
    # regenerated from (task, config, source_index), so JSON-mangled metadata does not matter
    right = reward.score(row(entry, task, answer, config=config, json_metadata=True))
    assert (right.reward, right.correct, right.status) == (1.0, True, "ok"), right


def test_without_config_the_rows_metadata_is_used(reward):
    entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=0)[0]
    assert reward.score(row(entry, "basic_arithmetic", entry["answer"])).reward == 1.0
    partial = reward.score(row(entry, "basic_arithmetic", f"{entry['answer']} or so"))
    assert 0.0 < partial.reward < 1.0 and partial.correct is False  # the package's partial credit


def test_game_of_life_halting_cannot_be_gamed(reward):
    ds = reasoning_gym.create_dataset("game_of_life_halting", size=8, seed=0)
    entry = next(e for e in ds if e["answer"] == "True")
    assert ds.score_answer("zzz", entry) == 1.0  # the package's scorer accepts anything non-empty
    assert reward.score(row(entry, "game_of_life_halting", "zzz")).reward == 0.0
    assert reward.score(row(entry, "game_of_life_halting", "True")).reward == 1.0


def test_composite_entries_are_scored_by_their_source_task(reward):
    from reasoning_gym.composite import DatasetSpec

    ds = reasoning_gym.create_dataset("composite", size=4, seed=0, datasets=[
        DatasetSpec("basic_arithmetic", 1, {}), DatasetSpec("word_sorting", 1, {})])
    for e in ds:
        rg = {"entry_metadata": e["metadata"]}  # task taken from source_dataset
        inp = RewardInput(response=f"<answer>{e['answer']}</answer>", ground_truth=e["answer"], prompt=e["question"],
                          metadata={"reasoning_gym": rg})
        assert reward.score(inp).reward == 1.0


@pytest.mark.parametrize("metadata,reason", [
    ({}, "metadata['reasoning_gym'] is missing"),
    ({"reasoning_gym": {"task": "basic_arithmetic"}}, "entry_metadata"),
    ({"reasoning_gym": {"entry_metadata": {}}}, "['task'] is missing"),
    ({"reasoning_gym": {"task": "no_such_task", "entry_metadata": {}}}, "unknown reasoning-gym task 'no_such_task'"),
])
def test_bad_rows_are_verifier_errors(reward, metadata, reason):
    res = reward.score(RewardInput(response="<answer>1</answer>", ground_truth="1", metadata=metadata))
    assert res.status == "error" and reason in res.reason and res.reward == 0.0


def test_missing_answer_tag_is_a_wrong_answer(reward):
    entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=0)[0]
    inp = RewardInput(response=f"<answer>{entry['answer']}</answer><think>", ground_truth=entry["answer"],
                      metadata={"reasoning_gym": {"task": "basic_arithmetic", "entry_metadata": entry["metadata"]}})
    assert reward.score(inp).reward == 1.0
    no_tag = RewardInput(response=str(entry["answer"]), ground_truth=entry["answer"], metadata=inp.metadata)
    res = reward.score(no_tag)
    assert res.status == "ok" and res.reward == 0.0 and res.reason == "no <answer> tag"


def test_scorer_exception_is_a_wrong_answer_with_the_reason(reward):
    entry = reasoning_gym.create_dataset("prime_factorization", size=1, seed=0)[0]
    res = reward.score(row(entry, "prime_factorization", "zzz"))  # its scorer calls int() on the answer
    assert (res.status, res.reward, res.info["scorer_exception"]) == ("ok", 0.0, 1.0)
    assert "prime_factorization.score_answer raised ValueError" in res.reason


def test_hostile_answers_time_out(reward):
    """An answer that spins the scorer is killed at the time limit; the pool keeps serving."""
    from nemo_prorl.config.schema import ReasoningGymRewardConfig, RewardConfig

    r = ReasoningGymReward(RewardConfig(reasoning_gym=ReasoningGymRewardConfig(timeout_s=3.0, num_workers=1)))
    try:
        entry = reasoning_gym.create_dataset("intermediate_integration", size=1, seed=0)[0]
        res = r.score(row(entry, "intermediate_integration", "x**99999999"))
        assert res.status == "timeout" and res.reward == 0.0
        entry = reasoning_gym.create_dataset("countdown", size=1, seed=0)[0]
        assert r.score(row(entry, "countdown", entry["answer"])).reward == 1.0
    finally:
        r.close()


def _countdown_module() -> str:
    return type(reasoning_gym.create_dataset("countdown", size=1, seed=0)).__module__


# Issue 18: countdown's scorer (reasoning-gym 0.1.25) parse_expr-evaluates the answer in the scorer's
# process. These answers scored 1.0 for a wrong solution, and the first one kept every later answer that
# the same worker scored at 1.0.
PATCH_GLOBALS = ("__import__('sys').modules[%r].__dict__.update({'sorted': __import__('builtins').bool, "
                 "'np': __import__('unittest.mock').mock.MagicMock()}) or 1")
EDIT_ENTRY = ("__import__('builtins').exec(\"import sys\\nf = sys._getframe()\\nwhile 'entry' not in f.f_locals: "
              "f = f.f_back\\nf.f_locals['entry']['metadata'].update(numbers=[], target=len(''))\") or False")


def test_an_answer_that_patches_the_scorer_scores_zero_and_the_patch_does_not_last(reward):
    entry = reasoning_gym.create_dataset("countdown", size=1, seed=0)[0]
    res = reward.score(row(entry, "countdown", PATCH_GLOBALS % _countdown_module()))
    assert res.reward == 0.0 and res.status == "ok" and res.info.get("tampered") == 1.0, res
    after = reward.score_batch([row(entry, "countdown", "1+1")] * 4)  # every worker: none keeps the patch
    assert [a.reward for a in after] == [0.05] * 4, after
    assert reward.score(row(entry, "countdown", entry["answer"])).reward == 1.0


def test_an_answer_that_edits_its_entry_through_frames_scores_zero(reward):
    entry = reasoning_gym.create_dataset("countdown", size=1, seed=0)[0]
    res = reward.score(row(entry, "countdown", EDIT_ENTRY))
    assert res.reward == 0.0 and res.info.get("tampered") == 1.0, res
    assert reward.score(row(entry, "countdown", entry["answer"])).reward == 1.0


def _probe(arg):
    """Runs where answers are scored (a forked child of a confined worker): what can it see and do?"""
    import ctypes
    import os
    import signal
    import socket

    data_file, trainer_pid, project = arg
    environs = []
    for pid in (os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            environs.append(open(f"/proc/{pid}/environ", "rb").read().decode("latin1"))
        except OSError:
            pass
    out = {"secret": os.environ.get("PRORL_TEST_SECRET"), "proc": "s3cret" in "".join(environs),
           "uid": os.getuid(), "root": sorted(os.listdir("/")), "project": sorted(os.listdir(project))}
    try:
        out["data"] = open(data_file).read()
    except OSError as e:
        out["data"] = type(e).__name__
    out["connect"] = socket.socket().connect_ex(("1.1.1.1", 53))
    for name, call in (("kill", lambda: os.kill(trainer_pid, signal.SIGUSR1)), ("fork", os.fork),
                       ("exec", lambda: os.execv("/bin/true", ["true"]))):
        try:
            out[name] = call()
        except OSError as e:
            out[name] = e.errno
    out["seccomp"] = ctypes.CDLL(None).prctl(21, 0, 0, 0, 0)  # PR_GET_SECCOMP
    return out


def test_answers_are_scored_confined(tmp_path, monkeypatch):
    """No environment secrets, no other process's environ (own PID namespace), no network, no data files, no signals
    to the trainer, no new processes, an unprivileged uid under seccomp."""
    import errno
    import os
    import signal
    from pathlib import Path

    from nemo_prorl.confine.workers import HardTimeoutPool

    monkeypatch.setenv("PRORL_TEST_SECRET", "s3cret")
    data = tmp_path / "train.jsonl"
    data.write_text("expected answers")
    data.chmod(0o644)
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    pool = HardTimeoutPool(1, ro_paths=[str(Path(__file__).parent)])
    try:
        project = Path(__file__).resolve().parents[1]
        o = pool.call(_probe, (str(data), os.getpid(), str(project)), timeout=60)
    finally:
        pool.close()
        signal.signal(signal.SIGUSR1, old)
    assert o.status == "ok", o
    p = o.value
    assert p["secret"] is None and p["proc"] is False and p["data"] == "FileNotFoundError", p
    assert p["connect"] != 0 and p["kill"] == errno.EPERM and p["fork"] == errno.EPERM, p
    assert p["exec"] == errno.EPERM and p["seccomp"] == 2 and got == [], p
    assert "home" not in p["root"] and "var" not in p["root"], p
    # of the project folder (data, runs, checkpoints) only the code it imports: the package, the tests and the
    # interpreter's virtualenv where that lies inside it (.venv, or make test-torch's .venv-torch<version>)
    assert set(p["project"]) <= {"nemo_prorl", "tests", Path(sys.prefix).name}, p
    if os.getuid() == 0:
        assert p["uid"] != 0


def _patch_scorer(arg):
    import sys

    mod = sys.modules[arg]
    mod.sorted = bool  # what an answer evaluated by the scorer could do, past the answer filter
    return "patched"


def _read_patch(arg):
    import sys

    return repr(getattr(sys.modules[arg], "sorted", None))


def test_the_state_guard_catches_a_patched_scorer_and_ends_the_worker():
    from pathlib import Path

    from nemo_prorl.confine.workers import HardTimeoutPool

    mod = _countdown_module()
    pool = HardTimeoutPool(1, preload=(mod,), ro_paths=[str(Path(__file__).parent)])
    try:
        o = pool.call(_patch_scorer, mod, timeout=60)
        assert o.status == "tampered" and f"{mod}.sorted" in o.reason, o
        assert pool.call(_read_patch, mod, timeout=60).value == "None"  # a fresh worker: the patch is gone
    finally:
        pool.close()


# Issue 18 review: the `code_like` blocklist let an answer through whose code hid in string escapes. It
# reaches sympy's parse_expr in countdown's scorer; `simplify` sympifies the decoded string, which then
# runs. Its payload swaps the scorer's `__code__` in place (the function object stays the same, so a
# snapshot of globals sees no change) and every later answer of that worker scored 1.0.
def _escaped(code: str) -> str:
    return 'simplify("' + "".join(f"\\x{ord(c):02x}" for c in code) + '")'


SWAP_CODE = ("__import__('builtins').exec(\"import sys\\nc = sys.modules[%r].CountdownDataset\\n"
             "c.score_answer.__code__ = (lambda self, answer, entry: 1.0).__code__\")")


def test_an_answer_outside_its_tasks_grammar_is_refused_before_scoring(reward):
    from nemo_prorl.rewards.extract import code_like

    entry = reasoning_gym.create_dataset("countdown", size=1, seed=0)[0]
    attack = _escaped(SWAP_CODE % _countdown_module())
    assert not code_like(attack)  # the blocklist alone lets it through
    res = reward.score(row(entry, "countdown", attack))
    assert res.reward == 0.0 and res.info.get("tampered") == 1.0 and "arithmetic" in res.reason, res
    nq = reasoning_gym.create_dataset("n_queens", size=1, seed=0)[0]
    res = reward.score(row(nq, "n_queens", "print(1) or [[1]]"))
    assert res.reward == 0.0 and "literal_or_text" in res.reason, res
    assert reward.score(row(nq, "n_queens", nq["answer"])).reward == 1.0


def test_the_state_guard_catches_a_scorer_rewritten_in_place(monkeypatch):
    """The second line behind the grammar: with the grammars off, the in-place swap is caught after the
    call (tampered, the worker ended) and later wrong answers of every worker score as wrong. On
    polynomial_multiplication, whose scorer parse_expr-evaluates the answer (countdown's no longer runs:
    it is scored by our override since issue 29)."""
    from nemo_prorl.rewards import reasoning_gym as rg

    monkeypatch.setattr(rg, "ANSWER_GRAMMARS", {})
    r = ReasoningGymReward()
    task = "polynomial_multiplication"
    try:
        entry = reasoning_gym.create_dataset(task, size=1, seed=0)[0]
        cls = type(reasoning_gym.create_dataset(task, size=1, seed=0))
        swap = SWAP_CODE.replace("CountdownDataset", cls.__name__) % cls.__module__
        res = r.score(row(entry, task, _escaped(swap)))
        assert res.reward == 0.0 and res.info.get("tampered") == 1.0 and "score_answer" in res.reason, res
        after = r.score_batch([row(entry, task, "y + 1")] * 4)
        assert [a.reward for a in after] == [0.0] * 4, after
        assert r.score(row(entry, task, entry["answer"])).reward == 1.0
    finally:
        r.close()


def _edit_table(arg):
    import sys

    sys.modules[arg].OVERRIDES["countdown"] = lambda answer, entry: 1.0  # in place: the dict stays the same
    return "edited"


def test_the_state_guard_catches_an_edited_table():
    from pathlib import Path

    from nemo_prorl.confine.workers import HardTimeoutPool

    mod = "nemo_prorl.rewards.reasoning_gym"
    pool = HardTimeoutPool(1, preload=(mod,), ro_paths=[str(Path(__file__).parent)])
    try:
        o = pool.call(_edit_table, mod, timeout=60)
        assert o.status == "tampered" and f"{mod}.OVERRIDES" in o.reason, o
    finally:
        pool.close()


def test_every_scorer_that_evaluates_answers_has_a_grammar_that_its_oracle_answers_fit():
    """Scans the installed reasoning-gym: a task whose score_answer calls eval, parse_expr or sympify must
    be in ANSWER_GRAMMARS (a new version's new scorer fails here until it is listed), and the oracle
    answers of each listed task fit its grammar."""
    import inspect
    import re

    from nemo_prorl.rewards.reasoning_gym import ANSWER_GRAMMARS

    evaluating = set()
    for task, (cls, _) in DATASETS.items():
        src = inspect.getsource(getattr(cls, "score_answer"))
        if re.search(r"\b(?:eval|parse_expr|sympify|exec)\(", src):
            evaluating.add(task)
    assert {"countdown", "n_queens"} <= evaluating  # the scan finds what it must
    evaluating.discard("number_sorting")  # evals only its oracle (`entry["answer"]`, our data), not the answer
    assert evaluating <= set(ANSWER_GRAMMARS), evaluating - set(ANSWER_GRAMMARS)
    for task, fits in ANSWER_GRAMMARS.items():
        # by design not: an oracle that is an unevaluated integral (restating the question would score 1)
        bad = [e["answer"] for e in reasoning_gym.create_dataset(task, size=200, seed=3)
               if not fits(str(e["answer"])) and "Integral(" not in str(e["answer"])]
        assert bad == [], (task, bad[:3])


# Second review (issue 18): answers that passed the first grammars.
DEEP_EXEC = "-" * 2940 + "(exec)('self.score_answer=lamb'+'da a,e:1.0')"  # too deep for ast here, not for eval there


def test_an_answer_nested_past_the_parsers_depth_is_refused(reward):
    nq = reasoning_gym.create_dataset("n_queens", size=2, seed=0)
    res = reward.score(row(nq[0], "n_queens", DEEP_EXEC))
    assert res.reward == 0.0 and "literal_or_text" in res.reason, res
    assert [r.reward for r in reward.score_batch([row(nq[1], "n_queens", "garbage")] * 4)] == [0.0] * 4
    assert reward.score(row(nq[1], "n_queens", nq[1]["answer"])).reward == 1.0


def test_wrong_answers_that_fit_an_expression_grammar_score_as_wrong(reward):
    """No code runs in these: an integral restated as the answer, a countdown target built from `E`,
    and puzzle24's `1*2*3*4` (its scorer never checked that the numbers are the puzzle's)."""
    integ = reasoning_gym.create_dataset("simple_integration", size=1, seed=0)[0]
    restated = f"Integral({integ['metadata']['integrand']}, x)"
    assert reward.score(row(integ, "simple_integration", restated)).reward == 0.0
    cd = reasoning_gym.create_dataset("countdown", size=1, seed=0)[0]
    target = cd["metadata"]["target"]
    built = " + ".join(["floor(E)"] * (target // 2)) + (" + floor(E)/floor(E)" if target % 2 else "")
    assert reward.score(row(cd, "countdown", built)).reward == 0.0
    p24 = [e for e in reasoning_gym.create_dataset("puzzle24", size=20, seed=0)
           if sorted(e["metadata"]["numbers"]) != [1, 2, 3, 4]][0]
    assert reward.score(row(p24, "puzzle24", "1*2*3*4")).reward == 0.01
    assert reward.score(row(p24, "puzzle24", p24["answer"])).reward == 1.0
    assert reward.score(row(p24, "puzzle24", p24["answer"] + " + 1 - 1")).reward == 0.01  # other numbers


def test_a_bare_name_cannot_read_the_scorers_variables(reward):
    si = reasoning_gym.create_dataset("string_insertion", size=1, seed=0)[0]
    res = reward.score(row(si, "string_insertion", "oracle_answer"))
    assert res.reward == 0.0 and "literal_or_text" in res.reason, res
    assert reward.score(row(si, "string_insertion", si["answer"])).reward == 1.0  # capitals: a bare name


def _patch_dataset(job):
    from nemo_prorl.rewards import reasoning_gym as rg

    rg._dataset(job[0], job[1]).score_answer = lambda answer, entry: 1.0  # on the cached instance
    return "patched"


def test_the_state_guard_sees_the_cached_datasets():
    from pathlib import Path

    from nemo_prorl.rewards.reasoning_gym import prepare_in_worker
    from nemo_prorl.confine.workers import HardTimeoutPool

    entry = reasoning_gym.create_dataset("countdown", size=1, seed=0)[0]
    job = ("countdown", "{}", entry["metadata"], entry["question"], entry["answer"], "1+1")
    pool = HardTimeoutPool(1, preload=("nemo_prorl.rewards.reasoning_gym",), ro_paths=[str(Path(__file__).parent)])
    try:
        o = pool.call(_patch_dataset, job, timeout=60, prepare=prepare_in_worker)
        assert o.status == "tampered" and "reasoning_gym dataset countdown.score_answer" in o.reason, o
    finally:
        pool.close()
