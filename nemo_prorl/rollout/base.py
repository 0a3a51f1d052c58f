"""The interface every rollout engine implements (the embedded PyTorch sampler here, vLLM later)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from nemo_prorl.registry import Registry


@dataclass(frozen=True)
class SamplingParams:
    n: int  # samples per prompt
    temperature: float
    top_p: float
    max_tokens: int
    stop_token_ids: tuple[int, ...]
    seed: int


@dataclass
class Completion:
    prompt_index: int  # index into the prompts passed to generate()
    token_ids: list[int]  # response tokens, including the stop token if one was produced
    logprobs: list[float]  # sampling log-probability of each token (temperature applied, before top-p)
    finish_reason: str  # "stop" or "length"


class RolloutEngine(ABC):
    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """params.n completions per prompt, ordered prompt-major (prompt 0's n samples first)."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take (Hugging Face name, full tensor) pairs; called by nemo_prorl.weight_sync only."""

    def sleep(self) -> None:
        """Release memory while the policy trains (colocated engines); a no-op by default."""

    def wake_up(self) -> None: ...


# Entries are factories: (cfg: ProRLConfig, model_dir: Path) -> RolloutEngine.
ROLLOUT_ENGINES: Registry[Callable[..., RolloutEngine]] = Registry("rollout engine")
