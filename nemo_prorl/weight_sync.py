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
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

import torch

from nemo_prorl.cluster import shm
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


def sync_weights(policy: PolicyBackend, engine: RolloutEngine, *, bucket_mb: float,
                 version: Optional[int] = None) -> SyncStats:
    """Load the policy's current weights into the engine (after every update, and once at start): from
    the Megatron ranks on each engine's node when the engines are actors (`sync_node_local`), else through
    this process. The engine's `version` becomes `version` (None: one more). It may run while another
    thread generates: engines with `in_flight_updates` take the weights between two decode steps, the
    others between two generate calls."""
    from nemo_prorl.rollout.base import RolloutEngine
    from nemo_prorl.rollout.pool import EnginePool

    if isinstance(engine, EnginePool) and isinstance(policy, NodeLocalSource):
        return sync_node_local(policy, engine, bucket_mb=bucket_mb, version=version)
    return load_into_engine(policy.lazy_weights(), engine, bucket_mb=bucket_mb, version=version)


def load_into_engine(weights: Iterable[LazyWeight], engine: RolloutEngine, *, bucket_mb: float,
                     version: Optional[int] = None) -> SyncStats:
    """Stream HF-named weights into the engine bucket by bucket, each built in the engine's transfer
    buffer when it has one; then the engine's `version` is `version` (None: one more). A failure on the
    way releases the engine (`abort_weight_update`): generation paused by the update goes on."""
    start = time.perf_counter()
    n_tensors = n_bytes = n_buckets = 0
    dtype = engine.weight_dtype
    engine.begin_weight_update()
    try:
        for bucket in iter_buckets(weights, int(bucket_mb * 2**20), dtype):
            buffer = engine.staging_buffer(packed_size(bucket, dtype))
            if buffer is None:  # an in-process engine copies from the pieces' views itself
                engine.load_weights((w.name, w.materialize()) for w in bucket)
            else:
                engine.load_weights(pack(bucket, buffer, dtype))
            n_buckets += 1
            n_tensors += len(bucket)
            n_bytes += sum(w.nbytes(dtype) for w in bucket)
        engine.finish_weight_update(version)
    except BaseException:
        engine.abort_weight_update()
        raise
    return SyncStats(n_tensors, n_bytes, n_buckets, time.perf_counter() - start)


# ---------------------------------------------------------------------- node-local sync (engines as actors)
# A shard is identified by (stage, tensor-parallel rank); stage = model chunk * PP + pipeline rank. A
# mixture-of-experts model's experts are shards of their own, (stage, -1, EP rank, expert-TP rank), held by
# every rank of their expert-data-parallel group (policy/megatron_moe.py).
ShardKey = tuple[int, ...]
ShardMeta = list[tuple[str, list[int], str]]  # (name, shape, dtype name) of each tensor of a shard


class NodeLocalSource(ABC):
    """A policy whose ranks fill their own node's transfer buffer (the Megatron backend): the rank side is
    `NodeLocalSender`, driven by `sync_node_local`."""

    @abstractmethod
    def shard_layout(self) -> tuple[list[list[ShardKey]], list[int], dict[ShardKey, ShardMeta]]:
        """The shards each rank holds, each rank's node, and each shard's tensors."""

    @abstractmethod
    def rank_sites(self) -> Sequence[Site]:
        """(node, device) of each rank."""

    @abstractmethod
    def connect_relays(self, relays: Any) -> None:
        """Form the transport group with these weight relays (once; split mode)."""

    @abstractmethod
    def sync_prepare(self, transfers: list[tuple[int, int, ShardKey]], kinds: dict[int, set[str]], bucket_bytes: int,
                     dtype: str, relays: Any = None) -> list[int]:
        """All ranks (and relays): the transfers, then each leader (a key of `kinds`: its buffers, "device"
        and/or "host") plans its buckets; the number of buckets per rank (relays after the ranks)."""

    @abstractmethod
    def sync_pack(self, k: int, relays: Any = None) -> list[Optional[dict[str, tuple[tuple, list]]]]:
        """Leaders pack bucket k into their buffers; per rank (relays after the ranks): {kind: (handle,
        metas)}, None for the others."""

    @abstractmethod
    def sync_end(self, relays: Any = None) -> None: ...


Site = tuple[int, int]  # (node, device) of a transfer buffer; device -1: host shared memory of the node


def transfer_plan(held: Sequence[Sequence[ShardKey]], rank_sites: Sequence[Site],
                  engine_sites: Iterable[Site]) -> tuple[dict[Site, int], list[tuple[int, int, ShardKey]]]:
    """The node-local sync's plan. Each buffer site gets a leader: on a GPU site the rank on that GPU
    (the buffer is its device memory, shared by CUDA IPC with the engine on the same GPU); on a host site
    (node, -1) the node's lowest rank (a CPU node's shared memory, or engines on GPUs without a rank).
    The transfers (source rank, leader, shard) give each leader the shards it lacks: from a rank of its
    own node wherever one holds the shard, else from a holder on another node, spread over the replicas
    (the only bytes that cross nodes). With TP=1 and DP over every GPU nothing moves at all; with TP
    inside a node and DP over nodes nothing crosses nodes."""
    leaders: dict[Site, int] = {}
    for node, dev in sorted(set(engine_sites)):
        exact = [r for r, site in enumerate(rank_sites) if site == (node, dev)] if dev >= 0 else []
        on_node = [r for r, (n, _) in enumerate(rank_sites) if n == node]
        if not (exact or on_node):
            raise ValueError(f"node {node} hosts an engine but no Megatron rank: its weights have no local source")
        leaders[(node, dev)] = (exact or on_node)[0]
    holders: dict[ShardKey, list[int]] = {}
    for rank, keys in enumerate(held):
        for key in keys:
            holders.setdefault(key, []).append(rank)
    transfers = []
    for j, leader in enumerate(sorted(set(leaders.values()))):
        node = rank_sites[leader][0]
        for key in sorted(holders):
            if leader in holders[key]:
                continue
            local = [r for r in holders[key] if rank_sites[r][0] == node]
            transfers.append((local[0] if local else holders[key][j % len(holders[key])], leader, key))
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


def sync_node_local(source: NodeLocalSource, engine: "EnginePool", *, bucket_mb: float,
                    version: Optional[int] = None) -> SyncStats:
    """Each engine gets its weights from the Megatron ranks of its own node: a leader per buffer site
    (`transfer_plan`) collects the shards it lacks (from its node's peers; across nodes only what no local
    rank holds, by torch.distributed point-to-point), converts them to Hugging Face tensors straight into
    its transfer buffer, bucket by bucket, and the site's engines load each bucket from there. A node
    without ranks (split mode) gets a weight relay as its leader, which receives every shard. The
    controller sends commands and metadata only. The engines' `version` becomes `version` (None: one more)."""
    start = time.perf_counter()
    held, rank_nodes, metas = source.shard_layout()
    rank_sites = list(source.rank_sites())
    rankless = sorted(set(engine.engine_nodes()) - set(rank_nodes))
    relays = engine.relays(rankless) if rankless else None
    if relays is not None:
        source.connect_relays(relays)
    rank_sites += [(n, -1) for n in rankless]  # relays take the indices after the ranks
    on_gpu = engine.plan.layout.kind == "gpu"
    taken = set(rank_sites)
    sites = [(n, d) if on_gpu and (n, d) in taken else (n, -1) for n, d in engine.engine_devices()]
    leaders, transfers = transfer_plan(list(held) + [[] for _ in rankless], rank_sites, sites)
    cross = sum(_meta_bytes(metas[key]) for src, dst, key in transfers if rank_sites[src][0] != rank_sites[dst][0])
    kinds: dict[int, set[str]] = {}
    for (_, dev), r in leaders.items():
        kinds.setdefault(r, set()).add("device" if dev >= 0 else "host")
    dtype = DTYPE_NAMES[engine.weight_dtype] if engine.weight_dtype is not None else ""
    n_tensors = n_bytes = 0
    begun = False
    try:
        counts = source.sync_prepare(transfers, kinds, int(bucket_mb * 2**20), dtype, relays)
        n_buckets = max(counts[r] for r in kinds)
        engine.begin_weight_update()
        begun = True
        for k in range(n_buckets):
            out = source.sync_pack(k, relays)  # per leader rank: {buffer kind: (handle, metas)}
            packed = {site: out[r]["device" if site[1] >= 0 else "host"] for site, r in leaders.items()}
            engine.load_from_sites(packed, sites)
            for _, metas_k in packed.values():
                n_tensors += len(metas_k)
                n_bytes += sum(_meta_bytes([(n, shape, dt)]) for n, _, shape, dt in metas_k)
        engine.finish_weight_update(version)
    except BaseException:
        if begun:  # generation paused (or held off) by the update goes on
            engine.abort_weight_update()
        _end_failed_sync(source, relays)
        raise
    source.sync_end(relays)
    return SyncStats(n_tensors, n_bytes, n_buckets, time.perf_counter() - start, cross_node_bytes=cross)


def _end_failed_sync(source: NodeLocalSource, relays: Any) -> None:
    """After a failure mid-sync (the error in flight names the actor): every leader that is still alive
    drops its buffers. A group that failed was killed and its buffers removed by the controller
    (ActorGroup.abort); if it was the ranks, the relays' transport peers are gone (a relay may be waiting on
    one), so they are stopped the same way: a later sync of this pool fails by name, as after any relay
    failure (EnginePool.relays)."""
    try:
        source.sync_end(relays)
        return
    except Exception:  # noqa: BLE001
        pass
    if relays is not None and relays.actors:  # alive: the ranks are what failed
        relays.abort()


class NodeLocalSender:
    """The rank side of `sync_node_local`: this rank's shards (live parameter tensors, no copy), and on a
    node's leader the shards received from peers, the buckets and the node's transfer buffer."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # "device": this rank's GPU memory (CUDA IPC, for the engine on the same GPU; on a CPU rank the same
        # as host); "host": the node's shared memory, for engines on other devices
        self.buffers = {"device": TransferBuffer(device), "host": TransferBuffer(torch.device("cpu"))}
        self.kinds: set[str] = set()
        self.buckets: list[list[LazyWeight]] = []
        self.dtype: Optional[torch.dtype] = None
        self.received: dict[ShardKey, dict[str, torch.Tensor]] = {}
        self.transport: Optional[Any] = None  # the ranks + relays gloo group (split mode); None: torch's default

    def join_transport(self, rendezvous: Any, prefix: str, rank: int, size: int, timeout_s: float = 1800.0) -> None:
        """A gloo group of the Megatron ranks (their own ranks) and the weight relays of rank-less engine
        nodes (after them), meeting in the Megatron group's rendezvous actor (cluster/rendezvous.py, reached
        over Ray with the cluster's token) under keys of its own (`prefix`): the path of the bytes that go to
        nodes without ranks (split mode)."""
        import datetime

        import torch.distributed as dist

        from nemo_prorl.cluster.rendezvous import RayStore

        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.PrefixStore(prefix, RayStore(rendezvous, timeout))
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

    def plan_buckets(self, weights: Iterable[LazyWeight], bucket_bytes: int, dtype: str, kinds: set[str]) -> int:
        self.dtype = DTYPES_BY_NAME[dtype] if dtype else None
        self.buckets = list(iter_buckets(weights, bucket_bytes, self.dtype))
        self.kinds = set(kinds)
        size = max((packed_size(b, self.dtype) for b in self.buckets), default=1)
        for kind in self.kinds:
            self.buffers[kind].ensure(size)
        return len(self.buckets)

    def pack(self, k: int) -> Optional[dict[str, tuple[tuple, list]]]:
        if not self.buckets:
            return None
        out = {}
        for kind in sorted(self.kinds):
            buf = self.buffers[kind]
            items = pack(self.buckets[k], buf.tensor, self.dtype)
            buf.ready()
            out[kind] = (buf.handle, buf.metas(items))
        return out

    def end(self) -> None:
        """Drop what the sync gathered, and the buffers (see TransferBuffer)."""
        self.buckets, self.received, self.kinds = [], {}, set()
        for buf in self.buffers.values():
            buf.close()


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

    def join(self, rendezvous: Any, prefix: str, rank: int, size: int) -> None:
        if self.node_info()["ip"] in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a loopback cluster, as the ranks do
        self.rank = rank
        self.sender.join_transport(rendezvous, prefix, rank, size)

    def sync_prepare(self, transfers: list, kinds: dict[int, set[str]], bucket_bytes: int, dtype: str, metas: dict,
                     shape: Any, grid: tuple[int, int, int, int]) -> int:
        """Receive the shards this node lacks (all of them), then plan its buckets; `grid` is (stages, TP,
        EP, expert-TP)."""
        from nemo_prorl.policy.megatron_convert import megatron_to_hf_lazy
        from nemo_prorl.policy.megatron_moe import assemble

        self.sender.exchange(self.rank, {}, transfers, metas)
        if self.rank not in kinds:
            return 0
        stages, experts = assemble(self.sender.received, *grid, shape.is_moe)
        return self.sender.plan_buckets(megatron_to_hf_lazy(stages, shape, experts), bucket_bytes, dtype, {"host"})

    def sync_pack(self, k: int) -> Optional[dict[str, tuple[tuple, list]]]:
        return self.sender.pack(k)

    def sync_end(self) -> None:
        self.sender.end()
