"""The interface every policy backend implements (the transformers one here, Megatron-core later).

A batch is a dict of tensors with one row per response:
  input_ids      [B, P + R]  left-padded prompt, then the response right-padded
  attention_mask [B, P + R]
  response_mask  [B, R]      1 on response tokens (including the final EOS)
plus whatever the loss needs (old_logprobs, ref_logprobs, advantages). P is implied by the shapes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from nemo_prorl.registry import Registry

Batch = Mapping[str, torch.Tensor]
# (logprobs [b, R], entropy [b, R], micro-batch) -> (loss, metrics). Metrics must already be normalised by
# the mini-batch totals so that summing them over micro-batches gives the mini-batch value. It must pickle
# (a module-level function or a functools.partial of one): multi-process backends send it to their workers.
LossFn = Callable[[torch.Tensor, Optional[torch.Tensor], Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class PolicyBackend(ABC):
    @abstractmethod
    def logprobs(self, batch: Batch, *, temperature: float, reference: bool = False) -> torch.Tensor:
        """Per-token log-probabilities [B, R] of the response tokens (0 where response_mask is 0), from the
        policy or, with reference=True, from the frozen reference policy."""

    @abstractmethod
    def train_minibatch(self, batch: Batch, loss_fn: LossFn, *, temperature: float) -> dict[str, float]:
        """One optimizer step over `batch`, accumulated over micro-batches."""

    @abstractmethod
    def reset_reference(self) -> None:
        """Hard-reset the reference policy to the current policy (ProRL §2.3.1)."""

    @abstractmethod
    def reset_optimizer(self) -> None: ...

    @abstractmethod
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full (unsharded) tensors under Hugging Face names: the input of weight sync and export."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the policy as a Hugging Face folder (safetensors + config)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler and reference state for exact resume."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Release worker processes and devices (a no-op for in-process backends)."""


# Entries are factories: (cfg: ProRLConfig, model_dir: Path) -> PolicyBackend.
POLICY_BACKENDS: Registry[Callable[..., PolicyBackend]] = Registry("policy backend")


def split_rows(batch: Batch, size: int) -> Iterator[dict[str, torch.Tensor]]:
    n = next(iter(batch.values())).shape[0]
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in batch.items()}
