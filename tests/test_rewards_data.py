import pytest

from nemo_prorl.config.schema import SyntheticTaskConfig
from nemo_prorl.data import DATA_SOURCES
from nemo_prorl.data.synthetic import SyntheticSource, split_of
from nemo_prorl.rewards import RewardInput, RewardResult, safe_score


@pytest.mark.parametrize("response,truth,reward", [
    ("47", "47", 1.0),
    (" 47 ", "47", 1.0),
    ("-3", "-3", 1.0),
    ("3", "-3", 0.0),
    ("12 then 47", "47", 1.0),  # the last integer is the answer
    ("47 or 12", "47", 0.0),
    ("", "47", 0.0),
])
def test_arithmetic_reward(response, truth, reward):
    res = safe_score("arithmetic", RewardInput(response=response, ground_truth=truth))
    assert res.reward == reward and res.status == "ok" and res.correct is (reward == 1.0)


def test_rewards_never_raise():
    bad_truth = safe_score("arithmetic", RewardInput(response="4", ground_truth="four"))
    assert bad_truth.status == "error" and bad_truth.reward == 0.0 and "ValueError" in bad_truth.reason
    unknown = safe_score("no_such_reward", RewardInput(response="4", ground_truth="4"))
    assert unknown.status == "error" and "allowed values" in unknown.reason


def test_splits_are_disjoint_and_deterministic():
    task = SyntheticTaskConfig(tasks=["reverse", "sort", "arithmetic"])
    src = SyntheticSource(task, seed=3, num_validation=50)
    train = src.next_prompts(200)
    val = src.validation_set()
    assert len(val) == 50 and len({r.uid for r in val}) == 50
    train_exprs = {r.messages[0]["content"] for r in train}
    val_exprs = {r.messages[0]["content"] for r in val}
    assert not train_exprs & val_exprs
    assert all(split_of(e) == "train" for e in train_exprs)
    assert {r.domain for r in train} == {"reverse", "sort", "arithmetic"}
    again = SyntheticSource(task, seed=3, num_validation=50).next_prompts(200)
    assert [r.uid for r in again] == [r.uid for r in train]


def test_stream_resumes_exactly_from_its_state():
    task = SyntheticTaskConfig(tasks=["reverse", "sort", "arithmetic"])
    a = SyntheticSource(task, seed=0, num_validation=0)
    a.next_prompts(7)
    state = a.state_dict()
    expected = a.next_prompts(5)
    b = SyntheticSource(task, seed=0, num_validation=0)
    b.load_state_dict(state)
    assert [r.uid for r in b.next_prompts(5)] == [r.uid for r in expected]


def test_ground_truth_is_correct():
    for rec in SyntheticSource(SyntheticTaskConfig(tasks=["arithmetic"], max_operands=3, operators="+-*"), 1, 0).next_prompts(50):
        expr = rec.messages[0]["content"].rstrip("=")
        assert str(eval(expr)) == rec.ground_truth  # noqa: S307  (test-generated digits and operators)


def test_digit_tasks_and_their_rewards():
    src = SyntheticSource(SyntheticTaskConfig(), 5, 0)
    for rec in src.next_prompts(40):
        verb, digits = rec.messages[0]["content"].split()
        expected = digits[::-1] if verb == "reverse" else "".join(sorted(digits))
        assert rec.ground_truth == expected and rec.domain == verb and rec.reward == "exact_match"
        assert safe_score(rec.reward, RewardInput(response=expected + "\n", ground_truth=rec.ground_truth)).reward == 1
        assert safe_score(rec.reward, RewardInput(response=digits, ground_truth=rec.ground_truth)).reward == (
            1.0 if digits == expected else 0.0)


def test_unknown_task_names_the_key():
    src = SyntheticSource(SyntheticTaskConfig(tasks=["revers"]), 5, 0)
    with pytest.raises(KeyError, match="data.synthetic.tasks='revers'; allowed values: arithmetic, reverse, sort"):
        src.next_prompts(1)


def test_data_source_registry():
    assert DATA_SOURCES.names() == ["blend", "synthetic"]


class _Batched:
    calls = 0

    def score(self, inp):
        return self.score_batch([inp])[0]

    def score_batch(self, inputs):
        type(self).calls += 1
        return [RewardResult(float(i.response == "y"), correct=i.response == "y") for i in inputs]


class _Raises:
    def score(self, inp):
        raise RuntimeError("verifier bug")


def test_reward_suite_scores_mixed_rows_in_order_and_never_raises():
    from nemo_prorl.rewards import REWARDS, RewardSuite

    for name, cls in (("test_batched", _Batched), ("test_raises", _Raises)):
        if name not in REWARDS:
            REWARDS.register(name)(lambda cfg=None, cls=cls: cls())
    suite = RewardSuite(num_workers=2)
    names = ["test_batched", "exact_match", "test_raises", "test_batched", "nope"]
    inputs = [RewardInput(response=r, ground_truth="y") for r in ("y", "y", "y", "n", "y")]
    _Batched.calls = 0
    out = suite.score_batch(names, inputs)
    assert [r.reward for r in out] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert [r.status for r in out] == ["ok", "ok", "error", "ok", "error"]
    assert "verifier bug" in out[2].reason and "allowed values" in out[4].reason
    assert _Batched.calls == 1  # a batch-capable reward gets all its rows in one call
    suite.close()


def test_shaping_composes_stop_properly_then_overlong():
    import torch

    from nemo_prorl.config.schema import OverlongShapingConfig, RewardConfig, StopProperlyConfig
    from nemo_prorl.trainer.scoring import Scores, reward_health, shaped_rewards

    scores = Scores(rewards=torch.tensor([1.0, 1.0, 0.5, 1.0]), correct=torch.tensor([True, True, False, True]),
                    lengths=torch.tensor([4, 9, 10, 10]), truncated=torch.tensor([False, False, False, True]),
                    statuses=["ok", "ok", "timeout", "error"], domains=["math", "math", "code", "code"],
                    info=[{"x": 1.0}, {"x": 0.0}, {}, {}])
    off = shaped_rewards(scores, RewardConfig(), max_response_length=10)
    assert off.tolist() == [1.0, 1.0, 0.5, 1.0]
    cfg = RewardConfig(overlong=OverlongShapingConfig(enabled=True, buffer_length=4, penalty_factor=1.0),
                       stop_properly=StopProperlyConfig(enabled=True, truncated_reward_scale=0.5))
    # truncated row: 1.0 * 0.5, then the overlong ramp -1.0 at the limit; 9 tokens: -(9-6)/4
    assert shaped_rewards(scores, cfg, max_response_length=10).tolist() == [1.0, 0.25, -0.5, -0.5]
    health = reward_health(scores.statuses, scores.domains, scores.info)
    assert health == {"reward/error_frac": 0.25, "reward/timeout_frac": 0.25, "reward/math/x": 0.5}
