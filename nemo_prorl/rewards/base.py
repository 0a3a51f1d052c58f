"""The reward contract: `score(RewardInput) -> RewardResult`. A reward never raises: an exception or a
timeout becomes a result with status "error"/"timeout", reward 0, and the reason, which is distinct from
a wrong answer (status "ok", reward 0)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Protocol

from nemo_prorl.registry import Registry

Status = Literal["ok", "error", "timeout"]


@dataclass(frozen=True)
class RewardInput:
    response: str
    ground_truth: str
    prompt: str = ""
    finish_reason: str = "stop"  # "stop" or "length" (truncated)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardResult:
    reward: float
    correct: Optional[bool] = None  # binary verdict where the domain has one (pass@k counts these)
    status: Status = "ok"
    reason: str = ""


class RewardFn(Protocol):
    def score(self, inp: RewardInput) -> RewardResult: ...


# Entries are zero-argument factories returning a RewardFn.
REWARDS: Registry[Callable[[], RewardFn]] = Registry("reward")


@functools.lru_cache(maxsize=None)
def get_reward(name: str) -> RewardFn:
    return REWARDS.get(name)()


def safe_score(name: str, inp: RewardInput) -> RewardResult:
    """Score with the named reward; an unknown name or any exception is recorded, never raised."""
    try:
        return get_reward(name).score(inp)
    except Exception as e:  # noqa: BLE001  the contract is that scoring never takes the trainer down
        return RewardResult(0.0, correct=False, status="error", reason=f"{type(e).__name__}: {e}")
