"""Rewards scored on every node: one reward-worker actor per node of the plan, each with its own
RewardSuite (its own verifier pools and code sandbox, on that node's CPUs), a step's rows split between
them. A worker that dies, or hangs (no answer within `reward.worker_timeout_s`, by default derived from the
verifiers' own limits: `derived_worker_timeout`), is replaced and its rows are scored again; if the
replacement fails too, those rows are recorded as verifier errors (the reward contract: scoring never raises).

`reward_suite(cfg)` is what the trainer asks for: this, when `cluster.rewards_on_every_node` says so
(default: on a cluster of several nodes), else a RewardSuite in the controller's process.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

from nemo_prorl.cluster.actors import ActorBase, ActorError, ActorGroup
from nemo_prorl.procs import ignore_preemption_signals
from nemo_prorl.rewards import RewardInput, RewardSuite
from nemo_prorl.rewards.base import RewardResult, failed
from nemo_prorl.rewards.code_judge import SANDBOX_RUNS_PER_ROW

log = logging.getLogger("nemo_prorl")

# How long a node's worker may take for its rows (reward.worker_timeout_s, else derived_worker_timeout): a
# worker silent for longer is taken for hung, replaced once and its rows scored again, then recorded as errors.
# A fresh worker starts its verifier pools on its first rows: each spawned checker may take up to
# HardTimeoutPool's start_timeout (300 s) to import sympy / reasoning-gym; plus Ray's round trip.
START_MARGIN_S = 360.0
# A verifier call past its limit has its process killed and replaced (spawn and imports) before the next row
VERIFIER_RESTART_S = 5.0
# What the code reward waits for a program beyond reward.sandbox.total_timeout_s (the runner's outer limit in
# confine/sandbox.py; the HTTP client's in confine/remote.py)
SANDBOX_SLACK_S = {"local": 10.0, "remote": 30.0}
# Rewards without a limit of their own (exact_match, ifeval, ...) run in the worker's threads, in milliseconds
IN_THREAD_ROW_S = 1.0
# While a worker scores, the controller checks every few seconds that its process still answers (in a thread
# of its own, reward.worker_liveness_timeout_s): a hung process is found in about a minute, not after the
# worst case of worker_timeout_s, which a working worker may need when every answer runs to its limit.
LIVENESS_GROUP = "liveness"
LIVENESS_EVERY_S = 5.0


def derived_worker_timeout(reward: Any, names: Sequence[str]) -> float:
    """The longest a worker may legitimately take for rows scored by `names` (reward config `reward`): each
    row at its verifier's per-answer limit, spread over that verifier's processes, plus the start margin.
    Verifiers run side by side, so the sum over them is a safe bound."""
    sb = reward.sandbox
    per_row = {  # seconds a row may take / how many rows of that reward are checked at once
        "math": (reward.math.timeout_s + VERIFIER_RESTART_S) / reward.math.num_workers,
        "stem": reward.math.timeout_s + VERIFIER_RESTART_S,  # expression answers: one checker process
        "reasoning_gym": (reward.reasoning_gym.timeout_s + VERIFIER_RESTART_S) / reward.reasoning_gym.num_workers,
        # a row with replay tests (code_judge.py) runs the sandbox up to SANDBOX_RUNS_PER_ROW times
        "code": SANDBOX_RUNS_PER_ROW * (sb.total_timeout_s + SANDBOX_SLACK_S.get(sb.backend, 30.0)) / sb.num_workers,
    }
    in_thread = IN_THREAD_ROW_S / max(1, reward.num_workers)
    return START_MARGIN_S + sum(per_row.get(n, in_thread) for n in names)


def worker_timeout(reward: Any, names: Sequence[str]) -> float:
    """reward.worker_timeout_s, or the one derived for these rows."""
    return reward.worker_timeout_s or derived_worker_timeout(reward, names)


class RewardWorkerError(ActorError):
    pass


class RewardNode(ActorBase):
    """A node's reward worker: the controller's RewardSuite, on this node."""

    def __init__(self, log_path: str) -> None:
        ignore_preemption_signals()  # the controller checkpoints first, then stops its actors
        self.suite: Optional[RewardSuite] = None

    def init(self, reward_cfg: Any) -> None:
        self.suite = RewardSuite(reward_cfg)

    def score_batch(self, names: list[str], inputs: list[RewardInput]) -> list[RewardResult]:
        return self.suite.score_batch(names, inputs)

    def alive(self) -> bool:
        """The liveness check, called in the LIVENESS_GROUP thread beside a running score_batch."""
        return True

    def close(self) -> None:
        """Stop the suite's verifier and sandbox processes (killing the actor would orphan them)."""
        if self.suite is not None:
            self.suite.close()


def split_rows(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of n rows, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for k in range(parts):
        end = start + base + (k < extra)
        out.append((start, end))
        start = end
    return out


class NodeRewardSuite:
    """RewardSuite's `score_batch` / `close`, with the rows scored by one worker actor per node."""

    def __init__(self, cfg: Any) -> None:
        from nemo_prorl import cluster

        self.cfg = cfg
        plan = cluster.plan_from_config(cfg)
        self.num_nodes = plan.layout.num_nodes
        self._session = cluster.session(cfg, plan)
        self._placement = self._session.place(plan, cfg.cluster.ray_timeout_s)
        self.workers: list[Optional[ActorGroup]] = [None] * self.num_nodes
        self.replaced = 0  # workers started again after one died
        try:
            for n in range(self.num_nodes):
                self.workers[n] = self._start(n)
        except BaseException:
            self.close()
            raise

    def _start(self, node: int) -> ActorGroup:
        from nemo_prorl.cluster.actors import start_group

        group = start_group("reward worker", RewardNode, self._placement, [(node, 0, 0.0)], init_args=[("",)],
                            timeout_s=self.cfg.cluster.ray_timeout_s, error_type=RewardWorkerError,
                            concurrency_groups={LIVENESS_GROUP: 1})
        try:
            group.call_all("init", self.cfg.reward, timeout_s=self.cfg.cluster.ray_timeout_s)
        except ActorError:
            group.kill()
            raise
        return group

    def score_batch(self, names: Sequence[str], inputs: Sequence[RewardInput]) -> list[RewardResult]:
        if len(names) != len(inputs):
            raise ValueError(f"{len(names)} reward names for {len(inputs)} inputs")
        spans = split_rows(len(inputs), self.num_nodes)
        refs = [self._submit(n, a, b, names, inputs) for n, (a, b) in enumerate(spans)]
        out: list[RewardResult] = []
        for n, ((a, b), ref) in enumerate(zip(spans, refs)):
            out += self._collect(n, a, b, names, inputs, ref)
        return out

    def _submit(self, node: int, a: int, b: int, names: Sequence[str], inputs: Sequence[RewardInput]) -> Any:
        group = self.workers[node]
        if group is None or not group.actors:
            return None
        return group.actors[0].score_batch.remote(list(names[a:b]), list(inputs[a:b]))

    def _collect(self, node: int, a: int, b: int, names: Sequence[str], inputs: Sequence[RewardInput],
                 ref: Any) -> list[RewardResult]:
        """The node's results; after a failure, once more on a fresh worker, then errors for its rows."""
        for attempt in range(2):
            try:
                if ref is None:
                    raise RewardWorkerError(f"reward worker of node {node} is not running", role="reward worker")
                return self._await(node, ref, worker_timeout(self.cfg.reward, names[a:b]))
            except ActorError as e:
                log.warning("reward worker on node %d failed (%s); %s", node, str(e).splitlines()[0],
                            "starting a new one and scoring its rows again" if attempt == 0 else "giving up")
                if attempt == 1:
                    return [failed("error", f"reward worker on node {node}: {str(e).splitlines()[0]}") for _ in range(b - a)]
                try:
                    self.workers[node] = self._start(node)
                    self.replaced += 1
                except ActorError as e2:
                    return [failed("error", f"reward worker on node {node} cannot be replaced: {e2}") for _ in range(b - a)]
                ref = self._submit(node, a, b, names, inputs)
        raise AssertionError("unreachable")

    def _await(self, node: int, ref: Any, timeout_s: float) -> list[RewardResult]:
        """The node's answer to score_batch within `timeout_s`, checking every LIVENESS_EVERY_S that its process
        still answers. A worker that fails either is killed, and its error (RewardWorkerError) says which."""
        import ray

        group, liveness = self.workers[node], self.cfg.reward.worker_liveness_timeout_s
        deadline = time.monotonic() + timeout_s
        while not ray.wait([ref], timeout=max(0.0, min(LIVENESS_EVERY_S, deadline - time.monotonic())))[0]:
            left = deadline - time.monotonic()
            if left <= 0:
                group._fail(0, "score_batch", "gave no answer",
                            f"nothing within {timeout_s:g}s (reward.worker_timeout_s)")
            ping = group.actors[0].alive.options(concurrency_group=LIVENESS_GROUP).remote()
            if not ray.wait([ping], timeout=min(liveness, left))[0] and liveness <= left:
                group._fail(0, "score_batch", "stopped answering",
                            f"no answer to a liveness check within {liveness:g}s (reward.worker_liveness_timeout_s): "
                            "its process is stopped or frozen")
        return group.gather([ref], "score_batch", timeout_s)[0]  # its answer, or its failure named

    def close(self) -> None:
        workers, self.workers = self.workers, []
        for g in workers:
            if g is not None and g.actors:
                try:
                    g.call_all("close", timeout_s=30)
                except ActorError:
                    pass  # a dead worker's pools went with it
                g.kill()
        placement, self._placement = getattr(self, "_placement", None), None
        if placement is not None:
            self._session.release(placement)


def reward_suite(cfg: Any) -> Any:
    """The run's rewards: scored on every node (NodeRewardSuite) or in this process (RewardSuite)."""
    from nemo_prorl.cluster.plan import layout_from_config

    return NodeRewardSuite(cfg) if layout_from_config(cfg).rewards_on_every_node else RewardSuite(cfg.reward)
