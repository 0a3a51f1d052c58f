"""The weight sync's protocol, driven from the controller: which path the weights take, the plan (who
leads each node's buffer, which shards move), and the steps (prepare, pack bucket by bucket, load, end),
with the clean-up after a failure. It is the one module that talks to both sides: the policy and the
engines only say what they hold (the policy its shards, rank sites and rank actors: `NodeLocalSource`;
the engine pool its engines' nodes and devices, a `load_bucket` per engine, the update gate and actors
started on its placement: `NodeLocalEngines`), and never call back into the sync.

Two paths:
- through the controller (`load_into_engine`): the hf policy, or evaluation, with the engine in this
  process or in actors on this node; buckets are built in the engine's staging buffer;
- node-local (`sync_node_local`), when the policy's Megatron ranks and the engines are actors: one process
  per node (a rank, or a `WeightRelay` on a node without ranks: sender.py) fills its node's buffer for the
  node's engines, and only shards that no rank of the node holds cross nodes (torch.distributed
  point-to-point). No weight byte passes through the controller.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Protocol, Sequence, runtime_checkable

from nemo_prorl.cluster.actors import ActorGroup, gather_groups
from nemo_prorl.weight_sync.buffer import DTYPE_NAMES, DTYPES_BY_NAME, iter_buckets, pack, packed_size
from nemo_prorl.weight_sync.sender import Packed, ShardKey, ShardMeta, WeightRelay

if TYPE_CHECKING:  # (the policy and rollout packages import the weight sync: no import of them here)
    from nemo_prorl.policy.base import LazyWeight, PolicyBackend
    from nemo_prorl.rollout.base import RolloutEngine

Site = tuple[int, int]  # (node, device) of a transfer buffer; device -1: host shared memory of the node


@dataclass(frozen=True)
class SyncStats:
    num_tensors: int
    num_bytes: int  # bytes loaded into engines' transfer buffers (one buffer per node)
    num_buckets: int
    seconds: float
    cross_node_bytes: int = 0  # bytes that crossed nodes on their way (torch.distributed, never the controller)


@dataclass
class RankGroup:
    """A policy's rank actors as the node-local sync drives them: every rank answers `run(command, *args)`
    for the commands join_transport, sync_prepare, sync_pack and sync_end (policy/megatron_worker.py, which
    hands them to its sender.NodeLocalSender). The policy makes it once; the sync keeps its own state in it."""

    group: ActorGroup
    rendezvous: Any  # the ranks' key-value actor (cluster/rendezvous.py): the transport group meets there too
    world: int  # the number of ranks
    shape: Any  # the model's ModelShape: how a relay converts the shards
    grid: tuple[int, int, int, int]  # (stages, TP, EP, expert-TP); interleaved pipeline: stage = chunk * PP + pp rank
    timeout_s: float  # a sync command (policy.megatron.worker_timeout_s)
    join_timeout_s: float  # forming the transport group (cluster.ray_timeout_s)
    # the sync's: the weight relays the ranks share a transport group with (split mode), and how many such
    # groups were formed (each meets under keys of its own in the rendezvous: an earlier one's are still there)
    relays: Optional[ActorGroup] = None
    transports: int = 0


class NodeLocalSource(ABC):
    """A policy whose ranks fill their own node's transfer buffer (the Megatron backend)."""

    @abstractmethod
    def shard_layout(self) -> tuple[list[list[ShardKey]], list[int], dict[ShardKey, ShardMeta]]:
        """The shards each rank holds, each rank's node, and each shard's tensors."""

    @abstractmethod
    def rank_sites(self) -> Sequence[Site]:
        """(node, device) of each rank."""

    @abstractmethod
    def rank_group(self) -> RankGroup:
        """The rank actors, as the sync drives them."""


@runtime_checkable
class NodeLocalEngines(Protocol):
    """Engines as actors placed by the cluster plan (rollout/pool.py's EnginePool), besides RolloutEngine's
    update gate (begin/finish/abort_weight_update), `plan` and `weight_dtype`."""

    def engine_nodes(self) -> list[int]: ...

    def engine_devices(self) -> list[tuple[int, int]]: ...

    def load_bucket(self, per_engine: Sequence[tuple[tuple, list]]) -> None: ...

    def node_actors(self, role: str, actor_cls: Any, nodes: Sequence[int], init_args: tuple = ()) -> ActorGroup: ...


def sync_weights(policy: PolicyBackend, engine: RolloutEngine, *, bucket_mb: float,
                 version: Optional[int] = None) -> SyncStats:
    """Load the policy's current weights into the engine (after every update, and once at start): from
    the Megatron ranks on each engine's node when the engines are actors (`sync_node_local`), else through
    this process. The engine's `version` becomes `version` (None: one more). It may run while another
    thread generates: engines with `in_flight_updates` take the weights between two decode steps, the
    others between two generate calls."""
    if isinstance(engine, NodeLocalEngines) and isinstance(policy, NodeLocalSource):
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


def weight_relays(engine: NodeLocalEngines, nodes: Sequence[int]) -> ActorGroup:
    """The weight relays of these engine nodes (nodes without Megatron ranks: split mode), one per node,
    started on the engines' placement on first use and closed with them (sender.WeightRelay)."""
    return engine.node_actors("weight relay", WeightRelay, nodes, init_args=("",))


def sync_node_local(source: NodeLocalSource, engine: NodeLocalEngines, *, bucket_mb: float,
                    version: Optional[int] = None) -> SyncStats:
    """Each engine gets its weights from the Megatron ranks of its own node: a leader per buffer site
    (`transfer_plan`) collects the shards it lacks (from its node's peers; across nodes only what no local
    rank holds, by torch.distributed point-to-point), converts them to Hugging Face tensors straight into
    its transfer buffer, bucket by bucket, and the site's engines load each bucket from there. A node
    without ranks (split mode) gets a weight relay as its leader, which receives every shard. The
    controller sends commands and metadata only. The engines' `version` becomes `version` (None: one more)."""
    start = time.perf_counter()
    held, rank_nodes, metas = source.shard_layout()
    ranks = source.rank_group()
    rank_sites = list(source.rank_sites())
    rankless = sorted(set(engine.engine_nodes()) - set(rank_nodes))
    relays = weight_relays(engine, rankless) if rankless else None
    if relays is not None:
        _connect(ranks, relays)
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
        counts = _prepare(ranks, relays, transfers, kinds, int(bucket_mb * 2**20), dtype, metas)
        n_buckets = max(counts[r] for r in kinds)
        engine.begin_weight_update()
        begun = True
        for k in range(n_buckets):
            out = _pack(ranks, relays, k)  # per leader rank: {buffer kind: (handle, metas)}
            packed = {site: out[r]["device" if site[1] >= 0 else "host"] for site, r in leaders.items()}
            engine.load_bucket([packed[site] for site in sites])  # engine i from the buffer at its site
            for _, metas_k in packed.values():
                n_tensors += len(metas_k)
                n_bytes += sum(_meta_bytes([(n, shape, dt)]) for n, _, shape, dt in metas_k)
        engine.finish_weight_update(version)
    except BaseException:
        if begun:  # generation paused (or held off) by the update goes on
            engine.abort_weight_update()
        _end_failed_sync(ranks, relays)
        raise
    _end(ranks, relays)
    return SyncStats(n_tensors, n_bytes, n_buckets, time.perf_counter() - start, cross_node_bytes=cross)


# ---------------------------------------------------------------------- the steps, on ranks and relays
def _on_ranks(ranks: RankGroup, command: str, *args: Any) -> list[Any]:
    return ranks.group.call("run", [(command, *args)] * ranks.world, timeout_s=ranks.timeout_s, label=command)


def _connect(ranks: RankGroup, relays: ActorGroup) -> None:
    """Form the transport group of the ranks and these relays (once: it stays for the next syncs)."""
    if ranks.relays is relays:
        return
    ranks.transports += 1
    prefix, size, kv = f"transport-{ranks.transports}", ranks.world + len(relays.actors), ranks.rendezvous
    joins = [a.run.remote("join_transport", kv, prefix, size) for a in ranks.group.actors]
    relay_joins = [a.join.remote(kv, prefix, ranks.world + j, size) for j, a in enumerate(relays.actors)]
    gather_groups([(ranks.group, joins), (relays, relay_joins)], "join_transport", ranks.join_timeout_s)
    ranks.relays = relays


def _prepare(ranks: RankGroup, relays: Optional[ActorGroup], transfers: list[tuple[int, int, ShardKey]],
             kinds: dict[int, set[str]], bucket_bytes: int, dtype: str, metas: dict[ShardKey, ShardMeta]) -> list[int]:
    """All ranks and relays at once (they meet in the same point-to-point transfers): the transfers, then
    each leader (a key of `kinds`: its buffers, "device" and/or "host") plans its buckets; the number of
    buckets per rank (relays after the ranks)."""
    calls = [(ranks.group, [a.run.remote("sync_prepare", transfers, kinds, bucket_bytes, dtype, metas)
                            for a in ranks.group.actors])]
    if relays is not None:
        calls.append((relays, [a.sync_prepare.remote(transfers, kinds, bucket_bytes, dtype, metas, ranks.shape,
                                                     ranks.grid) for a in relays.actors]))
    return [n for counts in gather_groups(calls, "sync_prepare", ranks.timeout_s) for n in counts]


def _pack(ranks: RankGroup, relays: Optional[ActorGroup], k: int) -> list[Packed]:
    """Leaders pack bucket k into their buffers; per rank (relays after the ranks): {kind: (handle, metas)},
    None for the others."""
    out = _on_ranks(ranks, "sync_pack", k)
    if relays is not None:
        out += relays.call_all("sync_pack", k, timeout_s=ranks.timeout_s)
    return out


def _end(ranks: RankGroup, relays: Optional[ActorGroup]) -> None:
    _on_ranks(ranks, "sync_end")
    if relays is not None:
        relays.call_all("sync_end", timeout_s=ranks.timeout_s)


def _end_failed_sync(ranks: RankGroup, relays: Optional[ActorGroup]) -> None:
    """After a failure mid-sync (the error in flight names the actor): every leader that is still alive
    drops its buffers. A group that failed was killed and its buffers removed by the controller
    (ActorGroup.abort); if it was the ranks, the relays' transport peers are gone (a relay may be waiting on
    one), so they are stopped the same way: a later sync of this pool fails by name, as after any relay
    failure (EnginePool.node_actors)."""
    try:
        _end(ranks, relays)
        return
    except Exception:  # noqa: BLE001
        pass
    if relays is not None and relays.actors:  # alive: the ranks are what failed
        relays.abort()
