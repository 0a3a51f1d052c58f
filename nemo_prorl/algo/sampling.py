"""DAPO dynamic sampling (Yu et al. 2025, §3.2): a group whose responses all got the same reward has zero
advantage everywhere and only dilutes the batch, so it is dropped and more prompts are generated."""

from __future__ import annotations

import torch


def groups_with_signal(rewards: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """rewards [num_groups, group_size] -> bool [num_groups]: True where the rewards are not all equal
    (max - min > atol). Continuous rewards (fraction of tests passed) may want a small atol."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    spread = rewards.max(dim=-1).values - rewards.min(dim=-1).values
    return spread > atol


def take_groups(num_kept_so_far: int, keep: torch.Tensor, num_needed: int) -> torch.Tensor:
    """Indices of the groups of one generation round to add to the batch: the kept ones, in order, up to
    the `num_needed - num_kept_so_far` still missing. Extra groups are dropped, as in DAPO."""
    missing = max(num_needed - num_kept_so_far, 0)
    return torch.nonzero(keep, as_tuple=False).flatten()[:missing]


def minibatch_sizes(num_groups: int, groups_per_minibatch: int) -> list[int]:
    """Groups per update for a step that kept `num_groups` groups, planned at `groups_per_minibatch`.

    A full step gives num_groups / groups_per_minibatch updates of that size (ProRL §3.2: 256 prompts in
    mini-batches of 64, four updates). When DAPO's rounds fall short, cutting the kept groups into chunks of
    the planned size would leave a remainder that still gets a whole optimizer step at the full learning
    rate (130 groups: updates of 64, 64 and 2, where 2 groups move the policy as much as 64). Instead the
    number of updates is the kept groups over the mini-batch size, rounded to the nearest (at least one),
    and the groups are spread evenly over them, larger first: every update sees between 2/3 and 3/2 of a
    planned mini-batch (130 -> [65, 65], 65 -> [65], 1 -> [1]), and a full step is exactly as before."""
    if num_groups < 0 or groups_per_minibatch < 1:
        raise ValueError(f"num_groups={num_groups} must be >= 0 and groups_per_minibatch={groups_per_minibatch} >= 1")
    if num_groups == 0:
        return []
    updates = max(1, (2 * num_groups + groups_per_minibatch) // (2 * groups_per_minibatch))  # round half up
    base, extra = divmod(num_groups, updates)
    return [base + 1] * extra + [base] * (updates - extra)
