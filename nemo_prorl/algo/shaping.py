"""Reward shaping used in ProRL's runs: DAPO's soft overlong punishment and the penalty for responses that
do not stop properly (truncated at the length limit)."""

from __future__ import annotations

import torch


def overlong_penalty(
    response_lengths: torch.Tensor, *, max_response_length: int, buffer_length: int, penalty_factor: float
) -> torch.Tensor:
    """DAPO §3.4, eq. 13 (soft overlong punishment): 0 up to L_max - L_cache, then falling linearly to
    -penalty_factor at L_max, and -penalty_factor beyond. Added to the task reward."""
    if buffer_length <= 0:
        raise ValueError("buffer_length must be > 0")
    lengths = response_lengths.to(torch.float32)
    start = max_response_length - buffer_length
    ramp = (start - lengths) / buffer_length * penalty_factor
    return torch.where(lengths <= start, torch.zeros_like(lengths), ramp.clamp(min=-penalty_factor))


def stop_properly_penalty(rewards: torch.Tensor, truncated: torch.Tensor, *, truncated_reward_scale: float) -> torch.Tensor:
    """ProRL (Appendix E, runs 4-5) penalised responses cut off at the length limit: their reward is
    multiplied by `truncated_reward_scale` (0 gives them nothing however correct their prefix looks;
    1 disables the penalty)."""
    return torch.where(truncated, rewards * truncated_reward_scale, rewards)
