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
