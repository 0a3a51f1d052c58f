"""Policy backends behind one registry (`policy.backend`)."""

from nemo_prorl.policy.base import POLICY_BACKENDS, LossFn, PolicyBackend
from nemo_prorl.policy import hf as _hf  # noqa: F401  (registers "hf")
from nemo_prorl.policy import megatron as _megatron  # noqa: F401  (registers "megatron")

__all__ = ["POLICY_BACKENDS", "LossFn", "PolicyBackend"]
