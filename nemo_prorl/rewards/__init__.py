"""Verifiers behind one registry; each data row names the one that scores it."""

from nemo_prorl.rewards.base import REWARDS, RewardFn, RewardInput, RewardResult, get_reward, safe_score
from nemo_prorl.rewards import exact as _exact  # noqa: F401  (registers "arithmetic", "exact_match")

__all__ = ["REWARDS", "RewardFn", "RewardInput", "RewardResult", "get_reward", "safe_score"]
