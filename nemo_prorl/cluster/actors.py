"""Actors on Ray, placed by the plan: one placement group per node (a bundle per device, packed on one node;
node 0's group on the Ray head, where the controller runs), actor groups driven together, and the errors
that name the actor, its node and the command when one fails or dies.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from nemo_prorl.cluster.plan import Plan
from nemo_prorl.cluster.runtime import CPU_SLOT

log = logging.getLogger("nemo_prorl")

HEAD = "node:__internal_head__"  # a resource only the Ray head node has
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its tracebacks


class ActorError(RuntimeError):
    """An actor of a group failed or died; the message names role, index, node and command."""

    def __init__(self, message: str, *, role: str = "", index: int = -1, node: str = "", command: str = "") -> None:
        super().__init__(message)
        self.role, self.index, self.node, self.command = role, index, node, command


class ActorBase:
    """What every actor of ours answers: where it runs."""

    def node_info(self) -> dict[str, Any]:
        """Where this actor runs (for error messages and the torch.distributed store)."""
        import ray

        return {"ip": ray.util.get_node_ip_address(), "host": socket.gethostname(), "pid": os.getpid(),
                "gpus": [str(g) for g in ray.get_gpu_ids()], "node_id": ray.get_runtime_context().get_node_id()}


class NodePlacement:
    """One placement group per node of the plan: node i's devices as bundles on one Ray node."""

    def __init__(self, plan: Plan, timeout_s: float) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.plan = plan
        self.used: dict[tuple[int, int], float] = {}
        lay = plan.layout
        unit = {"GPU": 1.0} if lay.kind == "gpu" else {CPU_SLOT: 1.0}
        self.groups = []
        for n in range(lay.num_nodes):
            bundles = [dict(unit) for _ in range(lay.devices_per_node)]
            if n == 0:
                bundles[0][HEAD] = 0.001  # node 0 is the controller's: engine 0 maps its shared memory
            self.groups.append(placement_group(bundles, strategy="STRICT_PACK"))
        ready = [g.ready() for g in self.groups]
        done, _ = ray.wait(ready, num_returns=len(ready), timeout=timeout_s)
        if len(done) < len(ready):
            missing = [n for n, r in enumerate(ready) if r not in done]
            self.close()
            have = ", ".join(f"{x['NodeManagerAddress']}: {x['Resources']}" for x in ray.nodes() if x.get("Alive"))
            raise ActorError(f"cannot place node(s) {missing} of the plan ({lay.num_nodes} x {lay.devices_per_node} "
                             f"{'GPU' if lay.kind == 'gpu' else CPU_SLOT}) within cluster.ray_timeout_s="
                             f"{timeout_s:g}: the Ray cluster has {have}", role="placement")

    def options(self, node: int, device: int, share: float) -> dict[str, Any]:
        """Ray actor options for an actor on (node, device) that takes `share` of the device. A GPU cannot
        be given out beyond its whole (Ray would leave the actor waiting forever): that fails here, by
        name. CPU slots only say which node: every actor takes a token share of one."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(self.groups[node], placement_group_bundle_index=device)
        opts: dict[str, Any] = {"scheduling_strategy": strategy, "num_cpus": 0, "max_restarts": 0}
        if self.plan.layout.kind == "gpu":
            used = self.used.get((node, device), 0.0) + share
            if used > 1.0 + 1e-9:
                raise ActorError(f"GPU {device} of node {node} is taken already ({used - share:g} of it); "
                                 "one rank and one engine share a GPU at most", role="placement")
            self.used[(node, device)] = used
            opts["num_gpus"] = share
        else:
            opts["resources"] = {CPU_SLOT: 0.01}
        return opts

    def free(self, node: int, device: int, share: float) -> None:
        if (node, device) in self.used:
            self.used[(node, device)] = max(0.0, self.used[(node, device)] - share)

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for g in self.groups:
            try:
                remove_placement_group(g)
            except Exception:  # noqa: BLE001  already gone with the cluster
                pass
        self.groups = []


@dataclass
class ActorGroup:
    """Actors of one role driven together: every command goes to all of them and their answers come back
    in order. The first failure or death kills the whole group (its peers would wait in a collective
    forever), removes what its actors left in shared memory (`abort`), and raises `error_type` naming the
    actor, its node and the command."""

    role: str
    actors: list[Any]
    nodes: list[str]  # "node N (ip)" of each actor
    error_type: Callable[..., ActorError] = ActorError
    placement: Optional[NodePlacement] = None
    slots: Sequence[tuple[int, int, float]] = ()
    infos: list[dict[str, Any]] = field(default_factory=list)  # each actor's node_info, once started
    shm_tag: str = ""  # the run's tag in its actors' transfer-buffer names (cluster/shm.py)
    # The failure that killed the group: a later command (another thread's: asynchronous steps) names it too
    failure: str = ""

    def call(self, method: str, per_actor_args: Sequence[tuple], *, timeout_s: float,
             label: Optional[str] = None) -> list[Any]:
        """`method` on every actor with its args; `label` names the command in errors (default: method)."""
        refs = [getattr(a, method).remote(*args) for a, args in zip(self.actors, per_actor_args)]
        return self.gather(refs, label or method, timeout_s)

    def call_all(self, method: str, *args: Any, timeout_s: float) -> list[Any]:
        return self.call(method, [args] * len(self.actors), timeout_s=timeout_s)

    def gather(self, refs: list[Any], command: str, timeout_s: float) -> list[Any]:
        return gather_groups([(self, refs)], command, timeout_s)[0]

    def _fail(self, i: int, command: str, what: str, detail: str) -> None:
        detail = _ANSI.sub("", detail).strip()
        message = f"{self.role} {i} on {self.nodes[i]} {what} during {command}:\n{detail}"
        if self.failure:  # killed by another thread's failure (asynchronous steps): that one says why
            message = f"{self.failure}\n(then {self.role} {i} {what} during {command}: the group was shut down)"
        self.failure = self.failure or message  # before the group is emptied: another thread may be looking
        self.abort()
        raise self.error_type(message, role=self.role, index=i, node=self.nodes[i], command=command) from None

    def kill(self) -> None:
        import ray

        actors, self.actors = self.actors, []
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001  already dead
                pass
        if actors and self.placement is not None:
            for slot in self.slots:
                self.placement.free(*slot)

    def abort(self) -> None:
        """Kill the group after a failure, and remove the transfer buffers its actors held (a sync they were
        in the middle of, the healthy ones' too): killed, they cannot remove their own. Never raises: the
        failure being reported matters more."""
        alive = bool(self.actors)
        self.kill()
        if not (alive and self.shm_tag and self.infos):
            return
        from nemo_prorl.cluster.shm import remove_on_nodes

        by_node: dict[str, list[int]] = {}
        for info in self.infos:
            by_node.setdefault(info["node_id"], []).append(info["pid"])
        try:
            removed = remove_on_nodes(self.shm_tag, by_node)
            if removed:
                log.info("removed the transfer buffers of the failed %s group: %s", self.role, ", ".join(removed))
        except Exception as e:  # noqa: BLE001
            log.warning("could not remove the transfer buffers of the failed %s group: %s", self.role, e)


def gather_groups(calls: Sequence[tuple[ActorGroup, list[Any]]], command: str, timeout_s: float) -> list[list[Any]]:
    """The answers to `command` from several groups' actors that wait on each other (one collective: the
    Megatron ranks and the weight relays), gathered together: the first failure or death in any group is
    named at once (that group is killed), not after a peer's time-out."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    owner: dict[Any, tuple[int, int]] = {}
    for g, (group, refs) in enumerate(calls):
        if not group.actors:
            after = f" after a failure: {group.failure}" if group.failure else ""
            raise group.error_type(f"the {group.role} actors have been shut down{after}", role=group.role,
                                   command=command)
        owner.update({r: (g, i) for i, r in enumerate(refs)})
    out: list[list[Any]] = [[None] * len(refs) for _, refs in calls]
    pending = [r for _, refs in calls for r in refs]
    deadline = time.monotonic() + timeout_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, min(1.0, deadline - time.monotonic())))
        for ref in ready:
            g, i = owner[ref]
            try:
                out[g][i] = ray.get(ref)
            except RayTaskError as e:  # the command raised: its traceback says why
                calls[g][0]._fail(i, command, "failed", str(e))
            except RayActorError as e:  # the process is gone (killed, crashed, out of memory)
                calls[g][0]._fail(i, command, "died", str(getattr(e, "error_msg", e)))
        if pending and time.monotonic() > deadline:
            g, i = owner[pending[0]]
            calls[g][0]._fail(i, command, "gave no answer", f"nothing within {timeout_s:g}s")
    return out


def start_group(role: str, actor_cls: Any, placement: NodePlacement, slots: Sequence[tuple[int, int, float]],
                *, init_args: Sequence[tuple], env: Optional[dict[str, str]] = None, timeout_s: float,
                runtime_env: Optional[dict[str, Any]] = None, error_type: Callable[..., ActorError] = ActorError,
                concurrency_groups: Optional[dict[str, int]] = None) -> ActorGroup:
    """Start one `actor_cls` per (node, device, share) slot, with its init args; wait until every one
    answers `node_info` (so a failed start is named here, not at the first command). `concurrency_groups`
    gives the actors threads of their own for methods called with `.options(concurrency_group=...)` (the
    others then run one at a time in the default group's thread, no longer the main one)."""
    import ray

    from nemo_prorl.cluster.current import current_session
    from nemo_prorl.cluster.shm import TAG_ENV

    remote = ray.remote(concurrency_groups=concurrency_groups)(actor_cls) if concurrency_groups \
        else ray.remote(actor_cls)
    session = current_session()
    tag = session.run_tag if session is not None else ""
    renv = dict(runtime_env or {})
    # the run's tag: the actor names its transfer buffers after it (weight_sync/buffer.py TransferBuffer), so that
    # the controller and the run's next job can find them
    renv["env_vars"] = {**renv.get("env_vars", {}), **(env or {}), **({TAG_ENV: tag} if tag else {})}
    options: list[dict[str, Any]] = []
    try:
        for n, d, share in slots:
            options.append(placement.options(n, d, share))
    except ActorError:
        for slot in slots[: len(options)]:
            placement.free(*slot)
        raise
    actors = [remote.options(**o, runtime_env=renv).remote(*args) for o, args in zip(options, init_args)]
    group = ActorGroup(role, actors, [f"node {n}" for n, _, _ in slots], error_type, placement, list(slots),
                       shm_tag=tag)
    infos = group.call_all("node_info", timeout_s=timeout_s)
    group.infos = infos
    group.nodes = [f"node {n} ({info['host']}, {info['ip']}, pid {info['pid']})" for (n, _, _), info in zip(slots, infos)]
    return group


def engine_gpus(placement: Any, plan: Any, timeout_s: float) -> dict[int, str]:
    """{engine index: its GPUs' ids as CUDA_VISIBLE_DEVICES lists them, its own first} for the engines
    over several GPUs. Ray gives an actor the one GPU of its bundle; the engine's vLLM worker processes
    need all of the plan's devices for it, whose ids a tiny task in each bundle reads (which bundle holds
    which physical GPU is Ray's choice). Untested here: no GPUs on the CPU test machines."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    wide = [e for e in plan.engines if len(e.devices) > 1]
    if plan.layout.kind != "gpu" or not wide:
        return {}

    @ray.remote(num_cpus=0, num_gpus=0.001)
    def gpu_id() -> str:
        return ",".join(str(g) for g in ray.get_gpu_ids())

    refs = {(e.index, d): gpu_id.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement.groups[e.node], placement_group_bundle_index=d)).remote() for e in wide for d in e.devices}
    ids = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    return {e.index: ",".join(ids[(e.index, d)] for d in e.devices) for e in wide}
