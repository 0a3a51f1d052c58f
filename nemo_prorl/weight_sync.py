"""The one path from trainer weights into rollout engines, used after every policy update.

Weights travel as full tensors under Hugging Face names, in size-bounded buckets, built directly in a
transfer buffer that the engines map (shared memory on CPU, CUDA IPC on GPU): each byte is copied once on
the sending side, and the peak extra memory is one bucket, whatever the model size. Engines that shard
again (vLLM TP) do so in their own `load_weights`, from these full tensors.

Two senders:
- the controller (`load_into_engine`): the hf policy, or evaluation, with the engine in this process or
  in actors on this node;
- the Megatron ranks themselves (`sync_node_local`), when the engines are actors: one rank per node fills
  its node's buffer for the node's engines, and only shards that no rank of the node holds cross nodes
  (torch.distributed point-to-point). No weight byte passes through the controller.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

import torch

from nemo_prorl.cluster.actors import ActorBase

if TYPE_CHECKING:  # (policy/megatron.py imports this module: no import of the policy package here)
    from nemo_prorl.policy.base import LazyWeight, PolicyBackend
    from nemo_prorl.rollout.base import RolloutEngine
    from nemo_prorl.rollout.pool import EnginePool

ALIGN = 64  # bytes; every packed tensor starts on a cache line, and any dtype view of it is aligned


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class SyncStats:
    num_tensors: int
    num_bytes: int  # bytes loaded into engines' transfer buffers (one buffer per node)
    num_buckets: int
    seconds: float
    cross_node_bytes: int = 0  # bytes that crossed nodes on their way (torch.distributed, never the controller)


DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class TransferBuffer:
    """A flat uint8 buffer that engine actors on this node map: a shared-memory file on CPU (created here
    with O_EXCL, mode 0600, unlinked when replaced or closed), CUDA memory shared by IPC on GPU. Its
    `handle` is what an engine needs to map it (vllm_server._open_buffer); `metas` describe the tensors
    packed in it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.tensor: Optional[torch.Tensor] = None
        self.handle: Optional[tuple] = None
        self._path: Optional[str] = None

    def ensure(self, nbytes: int) -> torch.Tensor:
        if self.tensor is None or self.tensor.numel() < nbytes:
            self.close()
            if self.device.type == "cuda":
                from torch.multiprocessing.reductions import reduce_tensor

                self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                self.handle = ("cuda", reduce_tensor(self.tensor))
            else:
                shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
                self._path = os.path.join(shm, f"prorl-weights-{os.getpid()}-{secrets.token_hex(8)}-{nbytes}")
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

    def unlink(self) -> None:
        """Remove the shared-memory file once the engines have mapped it: the mappings live on (and are
        reused by later syncs), and a process killed later leaves no model-sized file in /dev/shm."""
        if self._path is not None:
            Path(self._path).unlink(missing_ok=True)
            self._path = None

    def close(self) -> None:
        self.tensor = self.handle = None
        self.unlink()


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
    """Load the policy's current weights into the engine (after every update, and once at start): from
    the Megatron ranks on each engine's node when the engines are actors (`sync_node_local`), else through
    this process."""
    from nemo_prorl.rollout.base import RolloutEngine
    from nemo_prorl.rollout.pool import EnginePool

    if isinstance(engine, EnginePool) and isinstance(policy, NodeLocalSource):
        return sync_node_local(policy, engine, bucket_mb=bucket_mb)
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


# ---------------------------------------------------------------------- node-local sync (engines as actors)
# A shard is identified by (stage, tensor-parallel rank); stage = model chunk * PP + pipeline rank.
ShardKey = tuple[int, int]
ShardMeta = list[tuple[str, list[int], str]]  # (name, shape, dtype name) of each tensor of a shard


class NodeLocalSource(ABC):
    """A policy whose ranks fill their own node's transfer buffer (the Megatron backend): the rank side is
    `NodeLocalSender`, driven by `sync_node_local`."""

    @abstractmethod
    def shard_layout(self) -> tuple[list[list[ShardKey]], list[int], dict[ShardKey, ShardMeta]]:
        """The shards each rank holds, each rank's node, and each shard's tensors."""

    @abstractmethod
    def connect_relays(self, relays: Any) -> None:
        """Form the transport group with these weight relays (once; split mode)."""

    @abstractmethod
    def sync_prepare(self, transfers: list[tuple[int, int, ShardKey]], leaders: dict[int, int], bucket_bytes: int,
                     dtype: str, relays: Any = None) -> list[int]:
        """All ranks (and relays): the transfers, then each leader plans its buckets; the number of buckets
        per rank (relays after the ranks)."""

    @abstractmethod
    def sync_pack(self, k: int, relays: Any = None) -> dict[int, tuple[tuple, list]]:
        """Leaders pack bucket k into their node's buffer: {node: (buffer handle, metas)}."""

    @abstractmethod
    def sync_end(self, relays: Any = None) -> None: ...


def transfer_plan(held: Sequence[Sequence[ShardKey]], rank_nodes: Sequence[int],
                  engine_nodes: Iterable[int]) -> tuple[dict[int, int], list[tuple[int, int, ShardKey]]]:
    """The node-local sync's plan: a leader per engine node (its lowest rank) and the transfers (source
    rank, leader, shard) that give each leader the shards it lacks: from a rank of its own node wherever
    one holds the shard, else from the lowest rank that holds it (the only bytes that cross nodes). With
    TP inside a node and DP over nodes, every node holds a whole replica: nothing crosses."""
    leaders: dict[int, int] = {}
    for node in sorted(set(engine_nodes)):
        on_node = [r for r, n in enumerate(rank_nodes) if n == node]
        if not on_node:
            raise ValueError(f"node {node} hosts an engine but no Megatron rank: its weights have no local source")
        leaders[node] = on_node[0]
    holders: dict[ShardKey, list[int]] = {}
    for rank, keys in enumerate(held):
        for key in keys:
            holders.setdefault(key, []).append(rank)
    transfers = []
    for node, leader in leaders.items():
        for key in sorted(holders):
            if leader in holders[key]:
                continue
            local = [r for r in holders[key] if rank_nodes[r] == node]
            transfers.append((local[0] if local else holders[key][0], leader, key))
    return leaders, transfers


def _meta_bytes(meta: ShardMeta) -> int:
    total = 0
    for _, shape, dtype in meta:
        n = DTYPES_BY_NAME[dtype].itemsize
        for d in shape:
            n *= d
        total += n
    return total


DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def sync_node_local(source: NodeLocalSource, engine: "EnginePool", *, bucket_mb: float) -> SyncStats:
    """Each engine gets its weights from the Megatron ranks of its own node: a leader rank per node
    collects the shards it lacks (from its node's peers; across nodes only what no local rank holds, by
    torch.distributed point-to-point), converts them to Hugging Face tensors straight into its node's
    transfer buffer, bucket by bucket, and the node's engines load each bucket from there. A node without
    ranks (split mode) gets a weight relay as its leader, which receives every shard. The controller sends
    commands and metadata only."""
    start = time.perf_counter()
    held, rank_nodes, metas = source.shard_layout()
    rankless = sorted(set(engine.engine_nodes()) - set(rank_nodes))
    relays = engine.relays(rankless) if rankless else None
    if relays is not None:
        source.connect_relays(relays)
    nodes = list(rank_nodes) + rankless  # relays take the indices after the ranks
    leaders, transfers = transfer_plan(list(held) + [[] for _ in rankless], nodes, engine.engine_nodes())
    cross = sum(_meta_bytes(metas[key]) for src, dst, key in transfers if nodes[src] != nodes[dst])
    dtype = DTYPE_NAMES[engine.weight_dtype] if engine.weight_dtype is not None else ""
    try:
        counts = source.sync_prepare(transfers, leaders, int(bucket_mb * 2**20), dtype, relays)
        n_buckets = max(counts[r] for r in leaders.values())
        n_tensors = n_bytes = 0
        engine.begin_weight_update()
        for k in range(n_buckets):
            packed = source.sync_pack(k, relays)
            engine.load_from_nodes(packed)
            for _, metas_k in packed.values():
                n_tensors += len(metas_k)
                n_bytes += sum(_meta_bytes([(n, shape, dt)]) for n, _, shape, dt in metas_k)
        engine.finish_weight_update()
    finally:
        source.sync_end(relays)
    return SyncStats(n_tensors, n_bytes, n_buckets, time.perf_counter() - start, cross_node_bytes=cross)


class NodeLocalSender:
    """The rank side of `sync_node_local`: this rank's shards (live parameter tensors, no copy), and on a
    node's leader the shards received from peers, the buckets and the node's transfer buffer."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffer = TransferBuffer(device)
        self.buckets: list[list[LazyWeight]] = []
        self.dtype: Optional[torch.dtype] = None
        self.received: dict[ShardKey, dict[str, torch.Tensor]] = {}
        self.transport: Optional[Any] = None  # the ranks + relays gloo group (split mode); None: torch's default

    def join_transport(self, addr: str, port: int, secret: str, rank: int, size: int, timeout_s: float = 1800.0) -> None:
        """A gloo group of the Megatron ranks (their own ranks) and the weight relays of rank-less engine
        nodes (after them), on the Megatron group's store under its own secret prefix: the path of the
        bytes that go to nodes without ranks (split mode)."""
        import datetime

        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.PrefixStore(f"prorl-{secret}", dist.TCPStore(addr, port, is_master=False, timeout=timeout))
        self.transport = dist.ProcessGroupGloo(store, rank, size, timeout)

    def _send(self, t: torch.Tensor, dst: int) -> None:
        import torch.distributed as dist

        if self.transport is None:
            dist.send(t.contiguous(), dst)
        else:  # gloo: host memory
            self.transport.send([t.detach().contiguous().cpu()], dst, 0).wait()

    def _recv(self, shape: list[int], dtype: torch.dtype, src: int) -> torch.Tensor:
        import torch.distributed as dist

        if self.transport is None:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            dist.recv(t, src)
            return t
        t = torch.empty(shape, dtype=dtype)
        self.transport.recv([t], src, 0).wait()
        return t.to(self.device)

    @staticmethod
    def metas(own: dict[ShardKey, dict[str, torch.Tensor]]) -> dict[ShardKey, ShardMeta]:
        return {key: [(n, list(t.shape), DTYPE_NAMES[t.dtype]) for n, t in sd.items()] for key, sd in own.items()}

    def exchange(self, rank: int, own: dict[ShardKey, dict[str, torch.Tensor]],
                 transfers: list[tuple[int, int, ShardKey]], metas: dict[ShardKey, ShardMeta]) -> None:
        """Every rank walks the same list in the same order, sending or receiving where it takes part, so
        the point-to-point pairs always match (no cycles: one global order)."""
        self.received = {}
        for src, dst, key in transfers:
            if rank == src:
                for name, _, _ in metas[key]:
                    self._send(own[key][name], dst)
            elif rank == dst:
                self.received[key] = {name: self._recv(shape, DTYPES_BY_NAME[dtype], src)
                                      for name, shape, dtype in metas[key]}

    def plan_buckets(self, weights: Iterable[LazyWeight], bucket_bytes: int, dtype: str) -> int:
        self.dtype = DTYPES_BY_NAME[dtype] if dtype else None
        self.buckets = list(iter_buckets(weights, bucket_bytes, self.dtype))
        self.buffer.ensure(max((packed_size(b, self.dtype) for b in self.buckets), default=1))
        return len(self.buckets)

    def pack(self, k: int) -> tuple[tuple, list]:
        items = pack(self.buckets[k], self.buffer.tensor, self.dtype)
        self.buffer.ready()
        return self.buffer.handle, self.buffer.metas(items)

    def end(self) -> None:
        """Drop what the sync gathered; the buffer stays (mapped, its file removed) for the next sync."""
        self.buckets, self.received = [], {}
        self.buffer.unlink()


class WeightRelay(ActorBase):
    """The node-local sync's leader on a node without Megatron ranks (split mode: cluster.rollout_nodes): a
    CPU actor that receives the shards over the transport group (`NodeLocalSender.join_transport`),
    converts them to Hugging Face tensors into its node's shared-memory buffer, bucket by bucket, from
    which the node's engines load. Started by the engine pool (rollout/pool.py) on each such node."""

    def __init__(self, log_path: str) -> None:
        from nemo_prorl.procs import ignore_preemption_signals

        ignore_preemption_signals()  # the trainer checkpoints first, then stops its actors
        self.sender = NodeLocalSender(torch.device("cpu"))
        self.rank = -1

    def join(self, addr: str, port: int, secret: str, rank: int, size: int) -> None:
        if addr in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a loopback cluster, as the ranks do
        self.rank = rank
        self.sender.join_transport(addr, port, secret, rank, size)

    def sync_prepare(self, transfers: list, leaders: set[int], bucket_bytes: int, dtype: str, metas: dict,
                     shape: Any, grid: tuple[int, int]) -> int:
        """Receive the shards this node lacks (all of them), then plan its buckets; `grid` is (stages, TP)."""
        from nemo_prorl.policy.megatron_convert import megatron_to_hf_lazy

        self.sender.exchange(self.rank, {}, transfers, metas)
        stages: list[list[Any]] = [[None] * grid[1] for _ in range(grid[0])]
        for (stage, t), sd in self.sender.received.items():
            stages[stage][t] = sd
        return self.sender.plan_buckets(megatron_to_hf_lazy(stages, shape), bucket_bytes, dtype)

    def sync_pack(self, k: int) -> Optional[tuple[tuple, list]]:
        return self.sender.pack(k) if self.sender.buckets else None

    def sync_end(self) -> None:
        self.sender.end()
