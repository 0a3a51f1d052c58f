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
