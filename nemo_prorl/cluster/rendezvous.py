"""The rendezvous of a torch.distributed group (gloo's peer addresses, NCCL's unique id, the store barrier
of every new process group) kept in a Ray actor instead of a TCPStore.

torch's TCPStore has no authentication: anyone who reaches its port can list its keys (the random prefix
we used to hide the group's keys under included), read them and write keys the ranks then read. A Ray
actor is reachable only by clients holding the cluster's token (cluster/runtime.py), so the group's
rendezvous needs no port of its own at all: `start_rendezvous` creates the actor (on the head node, where
the controller runs), its handle goes to the ranks over Ray, and each rank wraps it in `RayStore`, a
`torch.distributed.Store` whose every method is a call on that actor.

Blocking reads (`get`, `wait`) wait inside the actor (an asyncio actor: one waiter does not hold up the
others' writes), up to the store's time-out, so a rank costs one call per key, not a polling loop.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any, Optional, Union

import torch.distributed as dist

# Ray's own answer may take a moment beyond the store's time-out (a busy head node): the actor says "timed
# out" itself; this margin only catches an actor that stopped answering.
_RAY_MARGIN_S = 60.0

Value = Union[str, bytes]


def _bytes(value: Value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class RendezvousKV:
    """The key-value table of one group (an asyncio Ray actor). Every method returns at once except
    `wait_keys`, which waits for keys another rank has yet to write."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self._changed: Optional[asyncio.Condition] = None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # created on the actor's event loop, at its first use
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        async with self._cond():
            self._cond().notify_all()

    async def set(self, key: str, value: bytes) -> None:
        self.data[key] = value
        await self._notify()

    async def multi_set(self, keys: list[str], values: list[bytes]) -> None:
        self.data.update(zip(keys, values))
        await self._notify()

    async def append(self, key: str, value: bytes) -> None:
        self.data[key] = self.data.get(key, b"") + value
        await self._notify()

    async def add(self, key: str, amount: int) -> int:
        value = int(self.data.get(key, b"0")) + amount
        self.data[key] = str(value).encode()
        await self._notify()
        return value

    async def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """TCPStore's semantics: a missing key is set only when `expected` is empty; the answer is the
        value the key holds afterwards (or `expected`, for a missing key left alone)."""
        current = self.data.get(key)
        if (current is None and expected == b"") or current == expected:
            self.data[key] = desired
            await self._notify()
            return desired
        return expected if current is None else current

    async def wait_keys(self, keys: list[str], timeout_s: float) -> Optional[list[bytes]]:
        """The values of `keys` once all exist; None after `timeout_s` without them."""
        cond = self._cond()
        try:
            async with cond:
                await asyncio.wait_for(cond.wait_for(lambda: all(k in self.data for k in keys)), timeout_s)
        except asyncio.TimeoutError:
            return None
        return [self.data[k] for k in keys]

    async def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    async def delete_key(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    async def num_keys(self) -> int:
        return len(self.data)


class RendezvousTimeout(dist.DistStoreError):
    pass


_LIVE: list["RayStore"] = []


class RayStore(dist.Store):
    """A torch.distributed.Store on a `RendezvousKV` actor (the handle `start_rendezvous` returned): what
    gloo's and NCCL's rendezvous, init_process_group's store barrier and megatron's new_group call.
    Waits end after the store's time-out (torch sets it from the group's) with an error naming the keys."""

    def __init__(self, actor: Any, timeout: datetime.timedelta = datetime.timedelta(seconds=1800)) -> None:
        super().__init__()
        self.actor = actor
        self.set_timeout(timeout)
        # torch keeps only the C++ half of a Python store: once the Python object is collected, its methods
        # are gone and the next call (megatron's new_group, long after init_process_group returned) fails
        # with "Not implemented". A store lives as long as its process, then (a few per process).
        _LIVE.append(self)

    def _call(self, method: str, *args: Any, wait_s: float = 0.0) -> Any:
        import ray

        return ray.get(getattr(self.actor, method).remote(*args), timeout=wait_s + _RAY_MARGIN_S)

    def _wait(self, keys: list[str], timeout: Optional[datetime.timedelta] = None) -> list[bytes]:
        seconds = (timeout or self.timeout).total_seconds()
        values = self._call("wait_keys", list(keys), seconds, wait_s=seconds)
        if values is None:
            raise RendezvousTimeout(f"the group's rendezvous store has no key(s) {list(keys)} after {seconds:g}s: "
                                    "a rank did not start or died (see the other ranks' errors)")
        return values

    def set(self, key: str, value: Value) -> None:
        self._call("set", key, _bytes(value))

    def get(self, key: str) -> bytes:
        return self._wait([key])[0]

    def multi_set(self, keys: list[str], values: list[Value]) -> None:
        self._call("multi_set", list(keys), [_bytes(v) for v in values])

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return self._wait(list(keys))

    def append(self, key: str, value: Value) -> None:
        self._call("append", key, _bytes(value))

    def add(self, key: str, amount: int) -> int:
        return self._call("add", key, int(amount))

    def compare_set(self, key: str, expected: Value, desired: Value) -> bytes:
        return self._call("compare_set", key, _bytes(expected), _bytes(desired))

    def wait(self, keys: list[str], timeout: Optional[datetime.timedelta] = None) -> None:
        self._wait(list(keys), timeout)

    def check(self, keys: list[str]) -> bool:
        return self._call("check", list(keys))

    def delete_key(self, key: str) -> bool:
        return self._call("delete_key", key)

    def num_keys(self) -> int:
        return self._call("num_keys")

    def has_extended_api(self) -> bool:
        return True  # append, multi_get, multi_set

    # torch's C++ side looks some of these up by their C++ names (getNumKeys is one, in torch 2.13)
    getNumKeys, deleteKey, compareSet = num_keys, delete_key, compare_set
    multiGet, multiSet, hasExtendedApi = multi_get, multi_set, has_extended_api


def start_rendezvous() -> Any:
    """A fresh `RendezvousKV` actor for one group, on the Ray head node (the controller's), taking no
    resources; it lives as long as its owner (this process) or until `stop_rendezvous`."""
    import ray

    from nemo_prorl.cluster.actors import HEAD

    remote = ray.remote(RendezvousKV)
    return remote.options(num_cpus=0, resources={HEAD: 0.001}, max_restarts=0, max_concurrency=1000).remote()


def stop_rendezvous(actor: Any) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001  already gone with the cluster
        pass
