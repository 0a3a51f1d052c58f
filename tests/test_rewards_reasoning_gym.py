"""Reasoning Gym: every task the package ships is scored by its own score_answer through our reward."""

import json

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


def test_hostile_answers_time_out_and_run_confined(reward, monkeypatch, tmp_path):
    """Some scorers eval the answer; they run in a worker without the trainer's environment or network,
    and one that spins is killed."""
    from nemo_prorl.config.schema import ReasoningGymRewardConfig, RewardConfig

    r = ReasoningGymReward(RewardConfig(reasoning_gym=ReasoningGymRewardConfig(timeout_s=3.0, num_workers=1)))
    try:
        entry = reasoning_gym.create_dataset("intermediate_integration", size=1, seed=0)[0]
        res = r.score(row(entry, "intermediate_integration", "x**99999999"))
        assert res.status == "timeout" and res.reward == 0.0
        monkeypatch.setenv("PRORL_TEST_SECRET", "s3cret")  # set before the replacement worker starts
        marker = tmp_path / "ran"
        probe = ("__import__('pathlib').Path(%r).write_text(repr(__import__('os').environ.get('PRORL_TEST_SECRET'))"
                 " + ' ' + repr(__import__('socket').socket().connect_ex(('1.1.1.1', 53))))") % str(marker)
        entry = reasoning_gym.create_dataset("countdown", size=1, seed=0)[0]
        r.score(row(entry, "countdown", probe))  # countdown's scorer (0.1.25) evaluates the expression it is given
        secret, connect = marker.read_text().split()  # so the probe ran: it saw no secret and no network
        assert secret == "None" and connect != "0"
    finally:
        r.close()
