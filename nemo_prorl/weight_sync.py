"""The one path from trainer weights into a rollout engine, used after every policy update.

Weights travel as full tensors under Hugging Face names, in size-bounded buckets. The policy hands them
over unmaterialised (`LazyWeight`: views of its tensor-parallel shards, gathered from every pipeline
stage), and each one is built directly in the engine's transfer buffer when the engine has one (vLLM:
shared memory its process maps, or CUDA IPC). So the trainer copies each byte once, and the peak extra
memory is one bucket, whatever the model size. Engines that shard again (vLLM TP) do so in their own
`load_weights`, from these full tensors."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

from nemo_prorl.policy.base import LazyWeight, PolicyBackend
from nemo_prorl.rollout.base import RolloutEngine

ALIGN = 64  # bytes; every packed tensor starts on a cache line, and any dtype view of it is aligned


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class SyncStats:
    num_tensors: int
    num_bytes: int
    num_buckets: int
    seconds: float


def module_of(name: str) -> str:
    """The module that owns a weight's module: q/k/v/o of one attention block, or gate/up/down of one MLP.
    An engine that fuses weights (vLLM's qkv_proj, gate_up_proj) needs a whole group to process it."""
    return name.rsplit(".", 2)[0]


def iter_buckets(weights: Iterable[LazyWeight], bucket_bytes: int,
                 dtype: Optional[torch.dtype] = None) -> Iterator[list[LazyWeight]]:
    """Group the stream into lists of at most `bucket_bytes` once packed (in `dtype` if given). Consecutive
    weights of one module (`module_of`) stay in one bucket; a group larger than that travels alone."""
    bucket: list[LazyWeight] = []
    size = 0
    for group in _consecutive_groups(weights):
        nbytes = sum(aligned(w.nbytes(dtype)) for w in group)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.extend(group)
        size += nbytes
    if bucket:
        yield bucket


def _consecutive_groups(weights: Iterable[LazyWeight]) -> Iterator[list[LazyWeight]]:
    group: list[LazyWeight] = []
    for w in weights:
        if group and module_of(w.name) != module_of(group[-1].name):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def packed_size(bucket: Iterable[LazyWeight], dtype: Optional[torch.dtype] = None) -> int:
    return sum(aligned(w.nbytes(dtype)) for w in bucket)


def pack(bucket: Iterable[LazyWeight], buffer: torch.Tensor,
         dtype: Optional[torch.dtype] = None) -> list[tuple[str, torch.Tensor]]:
    """Build each weight in place in `buffer` (flat uint8), one after another at aligned offsets, and
    return the (name, view) pairs."""
    out: list[tuple[str, torch.Tensor]] = []
    offset = 0
    for w in bucket:
        dt = dtype or w.dtype
        nbytes = w.nbytes(dt)
        if offset + nbytes > buffer.numel():
            raise ValueError(f"transfer buffer of {buffer.numel()} bytes is too small for {w.name}")
        view = buffer[offset : offset + nbytes].view(dt).view(w.shape)
        out.append((w.name, w.materialize(view)))
        offset += aligned(nbytes)
    return out


def sync_weights(policy: PolicyBackend, engine: RolloutEngine, *, bucket_mb: float) -> SyncStats:
    """Load the policy's current weights into the engine (after every update, and once at start)."""
    return load_into_engine(policy.lazy_weights(), engine, bucket_mb=bucket_mb)


def load_into_engine(weights: Iterable[LazyWeight], engine: RolloutEngine, *, bucket_mb: float) -> SyncStats:
    """Stream HF-named weights into the engine bucket by bucket, each built in the engine's transfer
    buffer when it has one."""
    start = time.perf_counter()
    n_tensors = n_bytes = n_buckets = 0
    dtype = engine.weight_dtype
    engine.begin_weight_update()
    for bucket in iter_buckets(weights, int(bucket_mb * 2**20), dtype):
        buffer = engine.staging_buffer(packed_size(bucket, dtype))
        if buffer is None:  # an in-process engine copies from the pieces' views itself
            engine.load_weights((w.name, w.materialize()) for w in bucket)
        else:
            engine.load_weights(pack(bucket, buffer, dtype))
        n_buckets += 1
        n_tensors += len(bucket)
        n_bytes += sum(w.nbytes(dtype) for w in bucket)
    engine.finish_weight_update()
    return SyncStats(n_tensors, n_bytes, n_buckets, time.perf_counter() - start)
