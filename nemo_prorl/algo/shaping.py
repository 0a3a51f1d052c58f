"""Reward shaping used in ProRL's runs: DAPO's soft overlong punishment and the penalty for responses that
do not stop properly (truncated at the length limit); ProRL v2's scheduled cosine length penalty."""

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


def cosine_length_penalty(
    response_lengths: torch.Tensor, *, max_response_length: int, min_value: float, max_value: float
) -> torch.Tensor:
    """ProRL v2's cosine length penalty (NVIDIA blog "Scaling LLM Reinforcement Learning with Prolonged
    Training Using ProRL v2", Aug 2025, "Scheduled cosine length penalty"):

        penalty(L) = min_value + (max_value - min_value) * (1 + cos(pi * min(L, L_max) / L_max)) / 2

    L: the response's tokens, L_max: the length limit, [min_value, max_value]: the blog's "reward/penalty
    boundaries" (max_value at L = 0, min_value at L_max; the curve of Yeo et al. 2025, §4.2, eq. 1). It is
    flat near both ends and steepest at L_max / 2, where it is their mean. `length_penalised` applies it."""
    if max_response_length <= 0:
        raise ValueError("max_response_length must be > 0")
    frac = response_lengths.to(torch.float32).clamp(min=0, max=max_response_length) / max_response_length
    return min_value + (max_value - min_value) * (1.0 + torch.cos(torch.pi * frac)) / 2.0


def length_penalised(rewards: torch.Tensor, penalty: torch.Tensor, truncated: torch.Tensor, *,
                     rewarded_only: bool) -> torch.Tensor:
    """The rewards with `penalty` (cosine_length_penalty's) applied.

    rewarded_only: a response with a positive reward that stopped properly gets reward * (1 + penalty); the
    rest keep theirs. Partial credit is scaled like full credit, and with penalty > -1 a positive reward stays
    positive: a rewarded answer of any length still outscores an unrewarded one (for reward 1, the blog's
    binary case, this is 1 + penalty: the same as adding it). Truncation is stop-properly's business, and
    penalising wrong answers by length would teach short wrong answers.
    Otherwise: reward + penalty for every response."""
    if not rewarded_only:
        return rewards + penalty
    return torch.where((rewards > 0) & ~truncated, rewards * (1.0 + penalty), rewards)


def length_penalty_active(step: int, *, start_step: int, on_steps: int | None, off_steps: int) -> bool:
    """The length penalty's schedule: from `start_step` on, `on_steps` steps on then `off_steps` off, over and
    over (the blog: "the penalty cycles on and off at regular intervals (for example, 100 updates on, 500
    off)"); on_steps None: on at every step from start_step."""
    if step < start_step:
        return False
    if on_steps is None:
        return True
    if on_steps < 0 or off_steps < 0 or on_steps + off_steps == 0:
        raise ValueError("need on_steps >= 0, off_steps >= 0 and on_steps + off_steps > 0")
    return (step - start_step) % (on_steps + off_steps) < on_steps
