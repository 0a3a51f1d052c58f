"""Rollout engines behind one registry (`rollout.engine`). All vLLM imports live in this package."""

from nemo_prorl.rollout.base import ROLLOUT_ENGINES, Completion, RolloutEngine, SamplingParams
from nemo_prorl.rollout import torch_engine as _torch_engine  # noqa: F401  (registers "torch")
from nemo_prorl.rollout import vllm_engine as _vllm_engine  # noqa: F401  (registers "vllm"; imports no vLLM)

__all__ = ["ROLLOUT_ENGINES", "Completion", "RolloutEngine", "SamplingParams"]
