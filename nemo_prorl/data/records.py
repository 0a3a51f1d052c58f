"""The typed record every data source produces, and the source interface the trainer consumes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

from nemo_prorl.registry import Registry


@dataclass(frozen=True)
class PromptRecord:
    uid: str
    messages: tuple[dict[str, str], ...]  # chat messages; the tokenizer's chat template renders them
    domain: str  # for per-domain metrics
    reward: str  # name in nemo_prorl.rewards.REWARDS that verifies responses to this prompt
    ground_truth: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the named source of a blend it came from (per-source validation figures)


class PromptSource(ABC):
    """A stream of training prompts plus a fixed validation set. The stream's position is its state,
    so a checkpoint can resume it exactly."""

    @abstractmethod
    def next_prompts(self, num: int) -> list[PromptRecord]: ...

    @abstractmethod
    def validation_set(self) -> list[PromptRecord]: ...

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def skipped_rows(self) -> int:
        """Bad rows skipped so far (data.on_bad_row=skip)."""
        return 0


# Entries are factories: (ProRLConfig) -> PromptSource.
DATA_SOURCES: Registry[Callable[..., PromptSource]] = Registry("data source")
