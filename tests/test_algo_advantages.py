import pytest
import torch

from nemo_prorl.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    dr_grpo_advantages,
    grpo_advantages,
    reinforce_pp_baseline_advantages,
)


def test_grpo_golden():
    # mean 0.5, unbiased std sqrt(1/3): advantages +-0.5 / 0.57735
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025]]), atol=1e-6, rtol=0)


def test_grpo_uniform_group_is_zero_not_nan():
    adv = grpo_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(adv, torch.zeros(2, 3))


def test_grpo_groups_are_independent():
    a = grpo_advantages(torch.tensor([[1.0, 0.0], [3.0, 5.0]]), eps=0.0)
    torch.testing.assert_close(a, torch.tensor([[0.707107, -0.707107], [-0.707107, 0.707107]]), atol=1e-6, rtol=0)


def test_dr_grpo_golden():
    adv = dr_grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25]]))


def test_reinforce_pp_baseline_golden():
    # centred [[.5, -.5], [0, 0]]; batch mean 0, unbiased var 0.5/3
    adv = reinforce_pp_baseline_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1.224745, -1.224745], [0.0, 0.0]]), atol=1e-6, rtol=0)


def test_reinforce_pp_baseline_token_weighted_golden():
    # weights [[3,1],[1,1]]: weighted mean 1/6, weighted unbiased var 1/6
    adv = reinforce_pp_baseline_advantages(
        torch.tensor([[1.0, 0.0], [1.0, 1.0]]), eps=0.0, token_counts=torch.tensor([[3, 1], [1, 1]])
    )
    torch.testing.assert_close(
        adv, torch.tensor([[0.816497, -1.632993], [-0.408248, -0.408248]]), atol=1e-6, rtol=0
    )


def test_registry_names_and_bad_shape():
    assert ADVANTAGE_ESTIMATORS.names() == ["dr_grpo", "grpo", "reinforce_pp_baseline"]
    with pytest.raises(ValueError, match="num_groups, group_size"):
        grpo_advantages(torch.tensor([1.0, 0.0]))
    with pytest.raises(KeyError, match="allowed values: dr_grpo, grpo, reinforce_pp_baseline"):
        ADVANTAGE_ESTIMATORS.get("ppo", "algo.advantage_estimator")


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "reinforce_pp_baseline"])
def test_equal_float32_rewards_give_exactly_zero(name):
    # float32 mean of sixteen 0.7s is 0.69999993: GRPO used to divide that by a std of 6e-8 (+0.0561 each)
    rewards = torch.stack([torch.full((16,), 0.7), torch.full((16,), 2 / 3), torch.full((16,), 0.1)])
    adv = ADVANTAGE_ESTIMATORS.get(name)(rewards)
    assert adv.dtype == torch.float32 and torch.equal(adv, torch.zeros(3, 16))


def test_grpo_continuous_rewards_only_zero_the_uniform_groups():
    # fractions of code tests passed: one group all at 2/3 (no signal), one mixed
    mixed = torch.tensor([2 / 3, 1 / 3, 1.0, 2 / 3] * 4)
    rewards = torch.stack([torch.full((16,), 2 / 3), mixed])
    adv = grpo_advantages(rewards, eps=1e-6)
    assert torch.equal(adv[0], torch.zeros(16))
    m64 = mixed.double()
    expected = ((m64 - m64.mean()) / (m64.std() + 1e-6)).float()
    assert torch.equal(adv[1], expected)  # computed in float64, rounded once
    assert abs(float(adv[1].sum())) < 1e-6


def test_reinforce_pp_baseline_whitens_like_verl_masked_whiten():
    # centred [[-5e-6, 5e-6], [0, 0]], unbiased var 5e-11 / 3; verl: x * rsqrt(var + 1e-8) = +-0.0499584
    adv = reinforce_pp_baseline_advantages(torch.tensor([[0.0, 1e-5], [0.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[-0.0499584, 0.0499584], [0.0, 0.0]]), atol=1e-7, rtol=0)
