"""Group-relative advantage estimators. Each takes rewards shaped [num_groups, group_size] (one row per
prompt, one column per sampled response) and returns advantages of the same shape; the trainer
broadcasts them over each response's tokens."""

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


def _check(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(
    rewards: torch.Tensor, *, eps: float = 1e-6, token_counts: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """GRPO outcome advantage (DeepSeekMath §4.1.2): z-score of each reward within its group.

    The unbiased (n-1) standard deviation matches verl's `compute_grpo_outcome_advantage`, which
    ProRL was trained with. A group whose rewards are all equal gets advantage 0, not NaN.
    """
    _check(rewards)
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True)
    return (rewards - mean) / (std + eps)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(
    rewards: torch.Tensor, *, eps: float = 1e-6, token_counts: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, §3.1): subtract the group mean only. Dividing by the group's std
    up-weights groups that are almost all right or all wrong, a question-level difficulty bias."""
    _check(rewards)
    return rewards - rewards.mean(dim=-1, keepdim=True)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor, *, eps: float = 1e-6, token_counts: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """REINFORCE++-baseline (ProRL v2; Hu et al. 2025 §3): subtract the group mean, then normalise over
    the whole batch. With `token_counts` [num_groups, group_size] the batch statistics weight each response
    by its number of tokens, as verl's token-level `masked_whiten` does; without it every response counts once.
    """
    _check(rewards)
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    w = torch.ones_like(centred) if token_counts is None else token_counts.to(centred.dtype)
    total = w.sum()
    mean = (centred * w).sum() / total
    # Unbiased variance over the weighted population (Bessel's correction on the total weight).
    var = ((centred - mean) ** 2 * w).sum() / (total - 1).clamp(min=1)
    return (centred - mean) * torch.rsqrt(var + eps * eps)
