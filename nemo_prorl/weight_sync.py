"""The one path from trainer weights into a rollout engine, used after every policy update.

Weights travel as (Hugging Face name, full tensor) pairs in size-bounded buckets, so the peak extra memory
is one bucket, whatever the model size. Backends that shard weights (Megatron TP/PP) gather them into this
same stream; engines that shard again (vLLM TP) do so in their own `load_weights`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from nemo_prorl.policy.base import PolicyBackend
from nemo_prorl.rollout.base import RolloutEngine


@dataclass(frozen=True)
class SyncStats:
    num_tensors: int
    num_bytes: int
    num_buckets: int
    seconds: float


def iter_buckets(
    weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group the stream into lists of at most `bucket_bytes` (a tensor larger than that travels alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def sync_weights(policy: PolicyBackend, engine: RolloutEngine, *, bucket_mb: float) -> SyncStats:
    start = time.perf_counter()
    n_tensors = n_bytes = n_buckets = 0
    for bucket in iter_buckets(policy.named_weights(), int(bucket_mb * 2**20)):
        engine.load_weights(bucket)
        n_buckets += 1
        n_tensors += len(bucket)
        n_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
    return SyncStats(n_tensors, n_bytes, n_buckets, time.perf_counter() - start)
