"""Verifiers behind one registry; each data row names the one that scores it (`PromptRecord.reward`). What
they run confined (programs, answers a scorer evaluates) runs through nemo_prorl/confine/, below this package."""

from nemo_prorl.rewards.base import (
    REWARDS, RewardFn, RewardInput, RewardResult, RewardSuite, get_reward, safe_score,
)

# Importing a module registers its rewards. Heavy dependencies (math-verify, reasoning-gym, langdetect)
# are imported lazily, on first use.
from nemo_prorl.rewards import exact as _exact  # noqa: F401,E402  "arithmetic", "exact_match"
from nemo_prorl.rewards import math_verifier as _math  # noqa: F401,E402  "math"
from nemo_prorl.rewards import code as _code  # noqa: F401,E402  "code"
from nemo_prorl.rewards import ifeval as _ifeval  # noqa: F401,E402  "ifeval"
from nemo_prorl.rewards import stem as _stem  # noqa: F401,E402  "stem"
from nemo_prorl.rewards import reasoning_gym as _rg  # noqa: F401,E402  "reasoning_gym"

__all__ = ["REWARDS", "RewardFn", "RewardInput", "RewardResult", "RewardSuite", "get_reward", "safe_score"]
