"""The wire format of the weight sync, shared by every side of it: full tensors under Hugging Face names,
grouped into size-bounded buckets (`iter_buckets`) and packed one after another, at aligned offsets, into a
flat transfer buffer that the engines map (`TransferBuffer`: shared memory on CPU, CUDA IPC on GPU). A
bucket travels as the buffer's `handle` and its `metas` (name, offset, shape, dtype name of each tensor).

The lowest module of the weight sync: it imports torch and the run's shared-memory names (cluster/shm.py)
only (the package's face, __init__.py, brings sync.py along at runtime, which imports neither the policy nor
the rollout package), so that the engines (rollout/pool.py), the ranks' side (sender.py) and the controller (sync.py) can
all speak it without importing each other.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

import torch

from nemo_prorl.cluster import shm

if TYPE_CHECKING:  # (the policy package imports the weight sync: no import of it here)
    from nemo_prorl.policy.base import LazyWeight

ALIGN = 64  # bytes; every packed tensor starts on a cache line, and any dtype view of it is aligned


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


class TransferBuffer:
    """A flat uint8 buffer that engine actors on this node map: a shared-memory file on CPU (created here
    with O_EXCL, mode 0600), CUDA memory shared by IPC on GPU. Its `handle` is what an engine needs to map
    it (vllm_server._open_buffer); `metas` describe the tensors packed in it. It lives for one sync: closed
    (its file removed) at the end, so no model-sized file outlives a sync, even if the run is killed later,
    and the next sync's engines (a new one among them) map a fresh buffer under a new handle.

    The file's name carries the run's tag (`tag`, else $PRORL_SHM_TAG, which the cluster gives every actor)
    and this process's pid (cluster/shm.py): what a failed sync or a killed job leaves is removed by the
    controller, or by the run's next job, by name. Untagged (a tool outside a run), a tag of its own."""

    def __init__(self, device: torch.device, tag: Optional[str] = None) -> None:
        self.device = device
        self.tensor: Optional[torch.Tensor] = None
        self.handle: Optional[tuple] = None
        self._path: Optional[str] = None
        self.tag = tag or os.environ.get(shm.TAG_ENV) or ""

    def ensure(self, nbytes: int) -> torch.Tensor:
        if self.tensor is None or self.tensor.numel() < nbytes:
            self.close()
            if self.device.type == "cuda":
                from torch.multiprocessing.reductions import reduce_tensor

                self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                self.handle = ("cuda", reduce_tensor(self.tensor))
            else:
                if self.tag:  # a later job of the run: first what an earlier one left on this node
                    shm.remove_stale(self.tag)
                tag = self.tag or secrets.token_hex(8)  # outside a run: a name no run's clean-up matches
                self._path = str(shm.shm_dir() / f"{shm.PREFIX}-{tag}-{os.getpid()}-{secrets.token_hex(8)}-{nbytes}")
                # created here, ours alone: never a file (or a link) someone put at that name beforehand
                os.close(os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
                self.tensor = torch.from_file(self._path, shared=True, size=nbytes, dtype=torch.uint8)
                self.handle = ("shm", self._path, nbytes)
        return self.tensor

    def offset(self, t: torch.Tensor) -> Optional[int]:
        """Byte offset of `t` in the buffer, or None when it lies elsewhere."""
        buf = self.tensor
        if buf is None or t.device != buf.device or not t.is_contiguous():
            return None
        off = t.data_ptr() - buf.data_ptr()
        return off if 0 <= off and off + t.numel() * t.element_size() <= buf.numel() else None

    def metas(self, items: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, int, list[int], str]]:
        return [(name, self.offset(t), list(t.shape), DTYPE_NAMES[t.dtype]) for name, t in items]

    def ready(self) -> None:
        """Before an engine reads the buffer: on GPU it reads on its own stream."""
        if self.tensor is not None and self.tensor.device.type == "cuda":
            torch.cuda.current_stream(self.tensor.device).synchronize()

    def close(self) -> None:
        self.tensor = self.handle = None
        if self._path is not None:
            Path(self._path).unlink(missing_ok=True)  # engines' mappings live on until they remap
            self._path = None


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
