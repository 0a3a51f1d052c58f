"""Rollout engines as Ray actors, data-parallel: `rollout.num_engines` engines placed by the cluster plan,
driven as one `RolloutEngine`.

`generate` deals a call's prompts out to the engines (whole prompts, balanced by count and length,
`split_prompts`), runs them concurrently and returns the completions in prompt order. Each prompt carries
its own seed, derived from the call's seed and its index in the call, so what it generates does not
depend on how many engines there are or which one it lands on (bit-identical where the engine is
batch-invariant: see README "Several rollout engines").

Weights reach the engines through a transfer buffer that they map on their own node: the controller's
(`staging_buffer`, when it holds the weights itself: the hf policy, evaluation), or a buffer each node's
Megatron rank fills (the node-local sync of weight_sync/sync.py, which tells each engine which buffer to
load: `load_bucket`), so that no weight byte passes through the controller. The pool knows the buffers'
wire format (weight_sync/buffer.py) but not the sync's protocol: it only exposes its engines' nodes and
devices, the update gate, and actors started on its placement (`node_actors`: the sync's weight relays).
Every engine actor answers the same commands (init, generate, begin_weight_update, load_bucket,
finish_weight_update, sleep, wake_up): vllm_server.EngineServer and torch_engine.TorchEngineServer.

Weight updates and generation (asynchronous steps call them from different threads): engine actors that
take updates in flight (`in_flight_updates`: the torch engine) run the weight commands in a thread of their
own (the "weights" concurrency group) beside a running `generate`, and pause it between two decode steps
themselves. For the others (vLLM) the pool keeps an update (begin .. finish, across the buckets) and a
generate call apart (`WeightGate`): a generate call waits for the update, an update for the running calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence

import torch

from nemo_prorl.cluster.actors import ActorError
from nemo_prorl.rollout.base import (Completion, RolloutEngine, SamplingParams, WeightGate, prompt_seed,
                                     split_prompts)
from nemo_prorl.weight_sync.buffer import TransferBuffer, pack, packed_size


class RolloutEngineError(ActorError):
    pass


WEIGHTS_GROUP = "weights"  # the engine actors' concurrency group of the weight commands (in-flight updates)


def _tail(path: Optional[Path], lines: int = 30) -> str:
    if path is None:
        return ""
    try:
        return f"\nlast lines of {path}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"\n(no log at {path})"


@dataclasses.dataclass
class EngineSetup:
    """What distinguishes one kind of engine actor from another."""

    role: str  # "vllm engine" | "torch engine": names the actors in errors
    server_cls: Any  # the actor class
    spec: dict[str, Any]  # the argument of its `init`
    weight_dtype: torch.dtype
    log_paths: list[Optional[Path]]  # one per engine: its stdout/stderr (None: Ray's worker log)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    runtime_env: dict[str, Any] = dataclasses.field(default_factory=dict)
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 7200.0
    error_type: Callable[..., ActorError] = RolloutEngineError
    on_close: Optional[Callable[[], None]] = None
    # Weight updates while `generate` runs (None: the actor class's `in_flight_updates`, False if it has none)
    in_flight_updates: Optional[bool] = None


def plan_problems(plan: Any) -> list[tuple[int, int, str]]:
    """(engine index, node, why) for each engine of `plan` this runtime does not start (`prorl doctor` asks too)."""
    out = []
    for e in plan.engines:
        if e.node != 0 and not plan.ranks:
            out.append((e.index, e.node, f"engine {e.index} on node {e.node}: with the policy in the controller "
                        "(policy=hf) the engines take their weights from it, on node 0"))
    return out


def _routed(x: Any) -> Optional[torch.Tensor]:
    """An engine's routed experts: a tensor (the torch engine), or (shape, int16 bytes) from the vLLM
    engine's process, whose torch and numpy need not be ours."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    shape, data = x
    return torch.frombuffer(bytearray(data), dtype=torch.int16).view(*shape)


class EnginePool(RolloutEngine):
    def __init__(self, cfg: Any, setup: EngineSetup, *, engine: str) -> None:
        from nemo_prorl import cluster
        from nemo_prorl.cluster.actors import engine_gpus, start_group

        self.setup = setup
        self.role = setup.role
        self.weight_dtype = setup.weight_dtype
        self.group = None
        self._node_groups: dict[str, Any] = {}  # node_actors by role
        self._placement = None
        self._buffer: Optional[TransferBuffer] = None
        self._device = torch.device(cfg.cluster.device)
        self.version = 0
        in_flight = setup.in_flight_updates
        self.in_flight_updates = bool(getattr(setup.server_cls, "in_flight_updates", False)
                                      if in_flight is None else in_flight)
        self._weights_group = WEIGHTS_GROUP if self.in_flight_updates else None
        self._gate = WeightGate()  # engines without in-flight updates: an update and generate calls apart
        plan = cluster.plan_from_config(cfg, engine=engine)
        self.plan = plan
        self._session = cluster.session(cfg, plan)
        try:
            self._check_plan(plan)
            self._placement = self._session.place(plan, cfg.cluster.ray_timeout_s)
            gpus = engine_gpus(self._placement, plan, cfg.cluster.ray_timeout_s)  # engines over several GPUs
            rank_devices = {(r.node, r.device) for r in plan.ranks}
            slots = [(e.node, e.devices[0], 0.5 if (e.node, e.devices[0]) in rank_devices else 1.0)
                     for e in plan.engines]
            self.group = start_group(setup.role, setup.server_cls, self._placement, slots,
                                     init_args=[(str(p) if p else "",) for p in setup.log_paths], env=setup.env,
                                     runtime_env=setup.runtime_env, timeout_s=setup.startup_timeout_s,
                                     error_type=setup.error_type,
                                     concurrency_groups={WEIGHTS_GROUP: 1} if self.in_flight_updates else None)
            self._call("init", [({**setup.spec, "visible_devices": gpus.get(e.index)},) for e in plan.engines],
                       timeout=setup.startup_timeout_s)
        except BaseException:
            self.close()
            raise

    def _check_plan(self, plan: Any) -> None:
        problems = plan_problems(plan)
        if problems:
            index, node, why = problems[0]
            where = {"node": f"node {node}"} if node else {}
            raise self.setup.error_type(why, role=self.role, index=index, **where)

    @property
    def num_engines(self) -> int:
        return len(self.plan.engines)

    def engine_nodes(self) -> list[int]:
        """The plan's node of each engine, in engine order."""
        return [e.node for e in self.plan.engines]

    def engine_devices(self) -> list[tuple[int, int]]:
        """(node, first device) of each engine, in engine order."""
        return [(e.node, e.devices[0]) for e in self.plan.engines]

    # ------------------------------------------------------------------ transport
    def _call(self, cmd: str, per_engine_args: Sequence[tuple], *, timeout: Optional[float] = None,
              concurrency_group: Optional[str] = None) -> list[Any]:
        """`cmd` on every engine, in the actors' `concurrency_group` (None: the default one)."""
        if self.group is None:
            raise self.setup.error_type(f"the {self.role}s have been closed", role=self.role, command=cmd)
        timeout_s = timeout or self.setup.request_timeout_s
        try:
            if concurrency_group is None:
                return self.group.call(cmd, per_engine_args, timeout_s=timeout_s)
            refs = [getattr(a, cmd).options(concurrency_group=concurrency_group).remote(*args)
                    for a, args in zip(self.group.actors, per_engine_args)]
            return self.group.gather(refs, cmd, timeout_s)
        except ActorError as e:
            log = self.setup.log_paths[e.index] if 0 <= e.index < len(self.setup.log_paths) else None
            raise self.setup.error_type(f"{e}{_tail(log)}", role=e.role, index=e.index, node=e.node,
                                        command=e.command) from None

    def _call_all(self, cmd: str, *args: Any, timeout: Optional[float] = None) -> list[Any]:
        return self._call(cmd, [args] * self.num_engines, timeout=timeout)

    def _call_weights(self, cmd: str, per_engine_args: Sequence[tuple], *,
                      timeout: Optional[float] = None) -> list[Any]:
        """A weight command: in the actors' own thread for it where updates land in flight."""
        return self._call(cmd, per_engine_args, timeout=timeout, concurrency_group=self._weights_group)

    # ------------------------------------------------------------------ RolloutEngine
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> list[Completion]:
        seeds = list(seeds) if seeds is not None else [prompt_seed(params.seed, i) for i in range(len(prompts))]
        parts = split_prompts([len(p) for p in prompts], self.num_engines)
        p = dataclasses.asdict(params)
        with self._generating():
            outs = self._call("generate", [([list(prompts[i]) for i in part], p, [seeds[i] for i in part])
                                           for part in parts])
        # (prompt index, token ids, logprobs, finish reason[, versions[, routed experts]]): an actor that
        # records no versions answers the first four, one that records no routing the first five
        done = [Completion(prompt_index=part[r[0]], token_ids=r[1], logprobs=r[2], finish_reason=r[3],
                           versions=r[4] if len(r) > 4 else None, routed_experts=_routed(r[5]) if len(r) > 5 else None)
                for part, out in zip(parts, outs) for r in out]
        return sorted(done, key=lambda c: c.prompt_index)  # stable: each prompt's samples stay in order

    def _generating(self) -> ContextManager[None]:
        """What a generate call holds: nothing where the engines take updates in flight, else the gate."""
        return contextlib.nullcontext() if self.in_flight_updates else self._gate.reading()

    def staging_buffer(self, nbytes: int) -> torch.Tensor:
        """The controller's transfer buffer (when it holds the weights: hf policy, evaluation); it is
        shared memory of this machine, so every engine must be on node 0."""
        away = [e.index for e in self.plan.engines if e.node != 0]
        if away:
            raise self.setup.error_type(f"engines {away} are not on the controller's node: they take their weights "
                                        "from the Megatron ranks of their own node (policy=megatron)", role=self.role)
        if self._buffer is None:
            self._buffer = TransferBuffer(self._device, tag=self._session.run_tag)  # named after the run
        return self._buffer.ensure(nbytes)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        items = list(weights)
        buf = self._buffer
        if buf is None or any(buf.offset(t) is None for _, t in items):  # not built in the buffer by the sync
            from nemo_prorl.policy.base import LazyWeight

            lazy = [LazyWeight(n, (t.clone() if buf is not None and buf.offset(t) is not None else t,))
                    for n, t in items]
            self.staging_buffer(packed_size(lazy, self.weight_dtype))
            buf = self._buffer
            items = pack(lazy, buf.tensor, self.weight_dtype)
        buf.ready()
        self.load_bucket([(buf.handle, buf.metas(items))] * self.num_engines)

    def load_bucket(self, per_engine: Sequence[tuple[tuple, list]]) -> None:
        """Engine i loads the bucket per_engine[i] = (handle of the transfer buffer it lies in, metas), a
        buffer of its own node (weight_sync/buffer.py)."""
        self._call_weights("load_bucket", list(per_engine))

    def node_actors(self, role: str, actor_cls: Any, nodes: Sequence[int], init_args: tuple = ()) -> Any:
        """An ActorGroup of `actor_cls(*init_args)`, one CPU actor per node of `nodes`, on the engines'
        placement (the weight sync's relays), started on first use and closed with the pool. One group per
        role: a group stopped by a failure stays stopped, and asking for it again fails by name."""
        from nemo_prorl.cluster.actors import start_group

        group = self._node_groups.get(role)
        if group is not None and not group.actors:
            raise self.setup.error_type(f"the {role}s were stopped by an earlier failure", role=role)
        if group is None:
            group = self._node_groups[role] = start_group(
                role, actor_cls, self._placement, [(n, 0, 0.0) for n in nodes], init_args=[init_args] * len(nodes),
                timeout_s=self.setup.startup_timeout_s, error_type=self.setup.error_type)
        return group

    def begin_weight_update(self) -> None:
        """Waits for the running generate calls (engines without in-flight updates) or for each engine's
        running decode step (with them); generation stays paused until finish_weight_update."""
        if not self.in_flight_updates:
            self._gate.begin()
        try:
            self._call_weights("begin_weight_update", [()] * self.num_engines)
        except BaseException:
            self.abort_weight_update()
            raise

    def finish_weight_update(self, version: Optional[int] = None) -> None:
        version = self.version + 1 if version is None else version  # every engine gets the same number
        try:
            self._call_weights("finish_weight_update", [(version,)] * self.num_engines)
            self.version = version
        finally:
            self._end_update()

    def abort_weight_update(self) -> None:
        """After a failed sync: the engines that are still alive go on generating (weights undefined)."""
        try:  # an actor that paused its own generation in begin_weight_update (the torch engine) resumes it
            if hasattr(self.setup.server_cls, "abort_weight_update") and self.group is not None and self.group.actors:
                self._call_weights("abort_weight_update", [()] * self.num_engines, timeout=60.0)
        except ActorError:
            pass  # that engine group is dead (and named by the error in flight)
        finally:
            self._end_update()

    def _end_update(self) -> None:
        self._gate.end()  # a no-op when no update holds it (in-flight engines; a second call)
        if self._buffer is not None:
            self._buffer.close()  # one buffer per sync (see TransferBuffer)

    def sleep(self) -> None:
        if self.plan.mode != "colocated":  # engines on devices of their own have nobody to give memory to
            return
        self._call_all("sleep")

    def wake_up(self) -> None:
        self._call_all("wake_up")

    def close(self) -> None:
        group, self.group = getattr(self, "group", None), None
        groups, self._node_groups = [group, *getattr(self, "_node_groups", {}).values()], {}
        for g in groups:
            if g is not None:
                g.kill()
        placement, self._placement = getattr(self, "_placement", None), None
        if placement is not None:
            self._session.release(placement)
        buf, self._buffer = getattr(self, "_buffer", None), None
        if buf is not None:
            buf.close()
        on_close = self.setup.on_close if hasattr(self, "setup") else None
        if on_close is not None:
            self.setup.on_close = None
            on_close()

    def __del__(self) -> None:
        if getattr(self, "group", None) is not None:
            self.close()
