"""The interface every rollout engine implements: the embedded PyTorch sampler and vLLM."""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

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
    stop: tuple[str, ...] = ()  # stop strings: the response ends with the token that completes one


@dataclass
class Completion:
    prompt_index: int  # index into the prompts passed to generate()
    token_ids: list[int]  # response tokens, including the stop token if one was produced
    # Log-probability of each token under the distribution it was drawn from: temperature applied, then
    # renormalised over the top-p set (vLLM's "processed_logprobs"). With top_p=1 (ProRL's setting) this
    # is exactly what the policy computes for the same tokens, which the mismatch check relies on.
    logprobs: list[float]
    finish_reason: str  # "stop" (stop token or string) or "length"
    # The policy version (RolloutEngine.version) of the weights each response token was sampled from
    # (len == len(token_ids)); a weight update that lands while a request runs switches it mid-response.
    # None: the engine does not record versions.
    versions: Optional[list[int]] = None
    # Mixture-of-experts models, rollout.routing_replay: the experts each MoE layer chose for every token the
    # engine fed to the model, i.e. the prompt and all response tokens but the last, as int16
    # [len(prompt) + len(token_ids) - 1, num_moe_layers, top_k] (rows in token order, layers in model
    # order). The trainer replays them (R3, arXiv 2510.11370). A token whose KV was rebuilt after an
    # in-flight weight update keeps the routing of the latest forward. None: not recorded.
    routed_experts: Optional[torch.Tensor] = None


def prompt_seed(seed: int, index: int) -> int:
    """The random stream of prompt `index` of a generate() call seeded `seed` (vLLM draws its n samples from
    seed, seed + 1, ...: prompts are spread far apart so that no two samples of a call share a stream).
    Engines that split a call's prompts between them pass each prompt's seed along, so that a completion
    does not depend on the engine it lands on."""
    return (seed * 1_000_003 + index * 65_537) % (2**31)


def split_prompts(lengths: Sequence[int], num_parts: int) -> list[list[int]]:
    """Whole prompts for each of `num_parts` engines: counts differ by at most one, and long prompts are
    dealt out in snake order (longest first: 0, 1, .., k-1, k-1, .., 0) so every part gets a similar share
    of the tokens. Each part lists its prompt indices in increasing order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for pos, i in enumerate(order):
        lap, k = divmod(pos, num_parts)
        parts[k if lap % 2 == 0 else num_parts - 1 - k].append(i)
    return [sorted(p) for p in parts]


class WeightGate:
    """Keeps weight updates and generation apart: readers (a generation step, or a whole generate call)
    run together, a writer (a weight update, from `begin` to `end`, possibly called from different threads
    and across several calls) runs alone. Writers come first: `begin` stops new readers at once and waits
    for the running ones, so a generator that loops without pause cannot starve a sync (a plain Lock
    would let it take the lock back first). `begin` must not be called by a thread inside `reading()`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @property
    def updating(self) -> bool:
        return self._writer

    @property
    def readers(self) -> int:
        return self._readers

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    def begin(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)  # one update at a time
            self._writer = True  # from here no reader starts
            self._cond.wait_for(lambda: self._readers == 0)

    def end(self) -> None:
        """After `begin`; idempotent, so that a failure path may call it once more."""
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout_s: Optional[float] = None) -> bool:
        """Wait until `predicate` (evaluated under the gate's lock) holds; it is re-checked at every `end`."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout_s)


class RolloutEngine(ABC):
    # dtype the engine holds its weights in; the weight sync converts to it while packing (None: as sent)
    weight_dtype: Optional[torch.dtype] = None
    # True: weights may change between two decode steps of a running generate call (a weight update from
    # another thread waits for the current step, and the requests go on with the new weights, recording
    # where in Completion.versions). False: an update must not overlap a generate call.
    in_flight_updates: bool = False
    # The policy version of the weights the engine holds: 0 at start, set by every finish_weight_update.
    version: int = 0

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> list[Completion]:
        """params.n completions per prompt, ordered prompt-major (prompt 0's n samples first). `seeds`: one
        per prompt (default: `prompt_seed(params.seed, i)` for prompt i). In a batch-invariant engine (the
        torch engine on CPU, vLLM with its batch-invariant kernels) a prompt's completions depend on its
        seed only, not on the other prompts of the call."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take (Hugging Face name, full tensor) pairs; called by nemo_prorl.weight_sync only."""

    def staging_buffer(self, nbytes: int) -> Optional[torch.Tensor]:
        """A flat uint8 buffer of at least `nbytes` that the weight sync builds a bucket in, for engines in
        another process (shared memory or CUDA IPC); None for in-process engines."""
        return None

    def begin_weight_update(self) -> None:
        """Called by the weight sync before the first bucket."""

    def finish_weight_update(self, version: Optional[int] = None) -> None:
        """Called by the weight sync after the last bucket (engines drop caches of the old weights); the
        engine's `version` becomes `version` (None: one more than before)."""
        self.version = self.version + 1 if version is None else version

    def abort_weight_update(self) -> None:
        """Called by the weight sync instead of finish_weight_update when a sync fails after
        begin_weight_update: whatever it paused or locked is released (the weights are then undefined, and
        `version` stays). Idempotent."""

    def sleep(self) -> None:
        """Release memory while the policy trains (colocated engines); a no-op by default."""

    def wake_up(self) -> None: ...

    def close(self) -> None:
        """Stop engine processes; a no-op for in-process engines."""


# Entries are factories: (cfg: ProRLConfig, model_dir: Path) -> RolloutEngine.
ROLLOUT_ENGINES: Registry[Callable[..., RolloutEngine]] = Registry("rollout engine")
