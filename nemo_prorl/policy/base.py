"""The interface every policy backend implements (the transformers one here, Megatron-core later).

A batch is a dict of tensors with one row per response:
  input_ids      [B, P + R]  left-padded prompt, then the response right-padded
  attention_mask [B, P + R]
  response_mask  [B, R]      1 on response tokens (including the final EOS)
plus whatever the loss needs (old_logprobs, ref_logprobs, advantages). P is implied by the shapes.
"""

from __future__ import annotations

import pickle
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from nemo_prorl.registry import Registry

Batch = Mapping[str, torch.Tensor]
STATE_FILE = "policy_state.pt"
# (logprobs [b, R], entropy [b, R], micro-batch) -> (loss, metrics). Metrics must already be normalised by
# the mini-batch totals so that summing them over micro-batches gives the mini-batch value. It must pickle
# (a module-level function or a functools.partial of one): multi-process backends send it to their workers.
LossFn = Callable[[torch.Tensor, Optional[torch.Tensor], Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class LazyWeight:
    """A full Hugging Face-named tensor held as views of its pieces (tensor-parallel shards, or the one
    tensor itself), concatenated along `dim` only when needed. The weight sync builds each one straight
    into the rollout engine's transfer buffer, so every byte is copied once on the trainer side."""

    name: str
    parts: tuple[torch.Tensor, ...]
    dim: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.parts[0].shape)
        shape[self.dim] = sum(p.shape[self.dim] for p in self.parts)
        return tuple(shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def nbytes(self, dtype: Optional[torch.dtype] = None) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * (dtype or self.dtype).itemsize

    def materialize(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The full tensor: written into `out` (converting dtype) when given, else a view of the single
        piece or a new tensor."""
        if out is None:
            return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts, dim=self.dim)
        if tuple(out.shape) != self.shape:
            raise ValueError(f"{self.name}: buffer shape {tuple(out.shape)} != weight shape {self.shape}")
        start = 0
        for p in self.parts:
            out.narrow(self.dim, start, p.shape[self.dim]).copy_(p)
            start += p.shape[self.dim]
        return out


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
        """Full (unsharded) tensors under Hugging Face names: the input of export."""

    def lazy_weights(self) -> Iterator[LazyWeight]:
        """The same stream as `named_weights`, unmaterialised: the input of the weight sync. Sharded
        backends override it so that no full tensor exists before it reaches the engine's buffer."""
        for name, tensor in self.named_weights():
            yield LazyWeight(name, (tensor,))

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the policy as a Hugging Face folder (safetensors + config)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler and reference state for exact resume."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_state(self, path: Path) -> None:
        """Write the resume state into checkpoint folder `path`, beside the HF weights. Multi-process
        backends override it to write one file per rank, in parallel."""
        save_plain_state(self.state_dict(), path / STATE_FILE)

    def load_state(self, path: Path) -> None:
        self.load_state_dict(load_plain_state(path / STATE_FILE))

    def close(self) -> None:
        """Release worker processes and devices (a no-op for in-process backends)."""


def save_plain_state(state: Any, f: Path) -> None:
    """torch.save `state`, then check that load_plain_state will read it back: a state that pickles some
    other object fails here, at the checkpoint, rather than at the resume that needs it."""
    torch.save(state, f)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    if unsafe:
        raise TypeError(f"{f.name}: the state holds objects that a weights_only load refuses ({', '.join(unsafe)}); "
                        "store them as tensors or plain data")


def load_plain_state(f: Path) -> Any:
    """Load a state file written by torch.save that holds only tensors and plain data (dicts, lists,
    numbers, strings), as optimizer and scheduler state dicts do. weights_only=True because a checkpoint
    is data: a tampered file whose pickle names any other callable is refused before anything runs,
    where a full unpickle would run it on resume. Raises ValueError naming the file."""
    try:
        return torch.load(f, weights_only=True)
    except pickle.UnpicklingError as e:  # what torch raises for a global it does not allow, or a bad opcode
        raise ValueError(f"{f.name} holds more than tensors and plain data, or is damaged; refused without "
                         f"unpickling it ({weights_only_reason(e)})") from e


def weights_only_reason(e: BaseException) -> str:
    """The one line of torch's weights_only refusal that says what was refused: its advice to load with
    weights_only=False (running the file's code) must not reach the user as the way out."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(e), re.S)
    if m is None:
        return "not loadable with weights_only=True"
    return " ".join(m.group(1).split()).split(" Please use `torch.serialization")[0]


# Entries are factories: (cfg: ProRLConfig, model_dir: Path) -> PolicyBackend.
POLICY_BACKENDS: Registry[Callable[..., PolicyBackend]] = Registry("policy backend")


