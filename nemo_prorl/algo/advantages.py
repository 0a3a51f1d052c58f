"""Group-relative advantage estimators. Each takes rewards shaped [num_groups, group_size] (one row per
prompt, one column per sampled response) and returns advantages of the same shape and dtype; the trainer
broadcasts them over each response's tokens.

Statistics are computed in float64 and a group whose rewards are all equal gets exactly 0: in float32 the
mean of sixteen 0.7s is 0.69999993, which GRPO's division by a std of 6e-8 would turn into +0.056 for every
sample of a group that carries no signal (continuous rewards such as the fraction of code tests passed)."""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from nemo_prorl.registry import Registry


class AdvantageEstimator(Protocol):
    def __call__(
        self, rewards: torch.Tensor, *, eps: float = 1e-6, token_counts: Optional[torch.Tensor] = None
    ) -> torch.Tensor: ...


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")

# Estimators that compare a response with its group need at least two responses per prompt.
NEEDS_GROUP = {"grpo", "dr_grpo", "reinforce_pp_baseline"}

# verl's `masked_whiten` adds this to the variance (REINFORCE++-baseline's batch normalisation).
WHITEN_EPS = 1e-8


def _check(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")


def _uniform(rewards: torch.Tensor) -> torch.Tensor:
    """[num_groups, 1] True where a group's rewards are all equal (no signal)."""
    return (rewards.amax(dim=-1, keepdim=True) == rewards.amin(dim=-1, keepdim=True))


def _centred(rewards: torch.Tensor) -> torch.Tensor:
    """float64 rewards minus their group mean; exactly 0 in groups whose rewards are all equal."""
    r = rewards.double()
    return torch.where(_uniform(rewards), 0.0, r - r.mean(dim=-1, keepdim=True))


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(
    rewards: torch.Tensor, *, eps: float = 1e-6, token_counts: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """GRPO outcome advantage (DeepSeekMath §4.1.2): z-score of each reward within its group, with `eps`
    added to the std.

    The unbiased (n-1) standard deviation matches verl's `compute_grpo_outcome_advantage`, which
    ProRL was trained with. A group whose rewards are all equal gets advantage exactly 0, not NaN.
    """
    _check(rewards)
    std = rewards.double().std(dim=-1, keepdim=True)
    adv = _centred(rewards) / (std + eps)
    return torch.where(_uniform(rewards), 0.0, adv).to(rewards.dtype)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(
    rewards: torch.Tensor, *, eps: float = 1e-6, token_counts: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, §3.1): subtract the group mean only. Dividing by the group's std
    up-weights groups that are almost all right or all wrong, a question-level difficulty bias."""
    _check(rewards)
    return _centred(rewards).to(rewards.dtype)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor, *, eps: float = 1e-6, token_counts: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """REINFORCE++-baseline (ProRL v2; Hu et al. 2025 §3): subtract the group mean, then whiten over the
    whole batch as verl's `masked_whiten` does: (x - mean) * rsqrt(var + 1e-8), with the unbiased variance.
    With `token_counts` [num_groups, group_size] the batch statistics weight each response by its number of
    tokens (verl whitens over tokens); without it every response counts once. `eps` (GRPO's std epsilon)
    is not used: like verl, the whitening has its own constant, WHITEN_EPS.
    """
    _check(rewards)
    centred = _centred(rewards)
    w = torch.ones_like(centred) if token_counts is None else token_counts.to(centred.dtype)
    total = w.sum()
    mean = (centred * w).sum() / total
    # Unbiased variance over the weighted population (Bessel's correction on the total weight).
    var = ((centred - mean) ** 2 * w).sum() / (total - 1).clamp(min=1)
    return ((centred - mean) * torch.rsqrt(var + WHITEN_EPS)).to(rewards.dtype)
