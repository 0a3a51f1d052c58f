"""The side of the node-local sync that holds the weights and fills a node's transfer buffer: a Megatron
rank (policy/megatron_worker.py hands its live shards to a `NodeLocalSender`) or, on a node without ranks
(split mode), a `WeightRelay`. Both do what the controller (sync.py) tells them, in the same steps: join the
transport group (relays only), exchange shards, convert the node's shards to Hugging Face tensors and plan
the buckets (`prepare`), pack bucket k into the node's buffer (`pack`), and drop it all (`end`).

It decides nothing: which rank leads which buffer and which shards move is the controller's plan
(sync.transfer_plan). Weight bytes go from rank to rank (torch.distributed point-to-point) and into the
buffers; only handles and metadata go back to the controller.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch

from nemo_prorl.cluster.actors import ActorBase
from nemo_prorl.weight_sync.buffer import DTYPE_NAMES, DTYPES_BY_NAME, TransferBuffer, iter_buckets, pack, packed_size

if TYPE_CHECKING:  # (the policy package imports the weight sync: no import of it here)
    from nemo_prorl.policy.base import LazyWeight

# A shard is identified by (stage, tensor-parallel rank); stage = model chunk * PP + pipeline rank. A
# mixture-of-experts model's experts are shards of their own, (stage, -1, EP rank, expert-TP rank), held by
# every rank of their expert-data-parallel group (policy/megatron_moe.py).
ShardKey = tuple[int, ...]
ShardMeta = list[tuple[str, list[int], str]]  # (name, shape, dtype name) of each tensor of a shard
Packed = Optional[dict[str, tuple[tuple, list]]]  # a leader's bucket: {buffer kind: (handle, metas)}


class NodeLocalSender:
    """One process's part in a node-local sync: its own shards (live parameter tensors, no copy), and on a
    node's leader the shards received from peers, the buckets and the node's transfer buffers."""

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

    def prepare(self, rank: int, own: dict[ShardKey, dict[str, torch.Tensor]],
                transfers: list[tuple[int, int, ShardKey]], kinds: dict[int, set[str]], bucket_bytes: int,
                dtype: str, metas: dict[ShardKey, ShardMeta], shape: Any, grid: tuple[int, int, int, int]) -> int:
        """Take part in the shard transfers; a leader (a key of `kinds`) then converts its node's shards
        (own and received: every shard of the model) to Hugging Face tensors, lazily, and plans its buckets.
        `shape` is the model's ModelShape, `grid` (stages, TP, EP, expert-TP). The number of buckets."""
        from nemo_prorl.policy.megatron_convert import megatron_to_hf_lazy
        from nemo_prorl.policy.megatron_moe import assemble

        self.exchange(rank, own, transfers, metas)
        if rank not in kinds:
            return 0
        stages, experts = assemble({**own, **self.received}, *grid, shape.is_moe)
        return self.plan_buckets(megatron_to_hf_lazy(stages, shape, experts), bucket_bytes, dtype, kinds[rank])

    def pack(self, k: int) -> Packed:
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
    which the node's engines load. Started by the sync (sync.weight_relays) on each such node, on the
    engine pool's placement; it answers the same sync commands as a rank's worker."""

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
        """Receive the shards this node lacks (all of them), then plan its buckets."""
        return self.sender.prepare(self.rank, {}, transfers, kinds, bucket_bytes, dtype, metas, shape, grid)

    def sync_pack(self, k: int) -> Packed:
        return self.sender.pack(k)

    def sync_end(self) -> None:
        self.sender.end()
