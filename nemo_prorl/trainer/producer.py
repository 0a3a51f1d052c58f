"""Asynchronous steps (algo.async.max_staleness = k > 0): a scheduling policy around the one loop of phases.

A producer keeps the rollout engines busy while the trainer updates. Its generator thread draws prompts
from the data source ahead of the trainer, a few requests at a time, and hands them to the engines; its
scorer thread scores each request as it finishes (the reward workers) and files the groups by their
position in the data stream. The trainer's generate phase (`take`) reads groups in that order: it drops
those whose oldest token is more than k policy versions behind the policy it updates, filters uniform
ones (DAPO) as they arrive, and stops when it has the groups the step needs.

Bounds: the groups drawn and not yet taken (in flight, scored, waiting) never exceed `capacity`
(k x groups per step by default), so the engines run at most about k versions ahead of the trainer.

Resume: the buffer is not saved. Each group carries the data source's state after its prompt was drawn;
the trainer checkpoints the state of the last group it took, so a resumed run draws the prompts that were
in flight again: no prompt is skipped or trained twice. A prompt's seed comes from its position in the
stream, so it is generated with the same random numbers again.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import queue
import threading
import time
from typing import Any, Callable, Optional, Sequence

import torch

from nemo_prorl.data.records import PromptRecord, PromptSource
from nemo_prorl.rollout.base import Completion, RolloutEngine, SamplingParams, prompt_seed
from nemo_prorl.trainer.scoring import Scores

log = logging.getLogger("nemo_prorl")


@dataclasses.dataclass
class Group:
    """One prompt's n completions, scored, with where it stands in the data stream."""

    seq: int  # position of the prompt in the run's data stream (0 = the run's first prompt)
    data_state: dict[str, Any]  # the source's state_dict() after this prompt was drawn
    generated_at: int = 0  # the engines' policy version when its request was handed to them
    prompt_ids: list[int] = dataclasses.field(default_factory=list)  # empty: too long, dropped at encoding
    completions: list[Completion] = dataclasses.field(default_factory=list)  # prompt_index 0
    # [n] shaped rewards as DAPO's filter sees them: without ProRL v2's length penalty, which the step that
    # takes the group applies (scoring.length_penalty_step), so the rewards trained on never depend on when
    # the scorer thread got to them
    shaped: Optional[torch.Tensor] = None
    scores: Optional[Scores] = None  # unshaped scores, for the metrics

    @property
    def too_long(self) -> bool:
        return not self.prompt_ids

    @property
    def oldest_version(self) -> int:
        """The version of the policy that generated the group's oldest token (empty responses have none)."""
        return min((min(c.versions) for c in self.completions if c.versions), default=self.generated_at)


@dataclasses.dataclass
class Taken:
    """What the trainer's generate phase took from the buffer for one step."""

    kept: list[Group]
    examined: list[Group]  # every group taken, in stream order: kept, filtered, stale or too long
    scored: list[Group]  # the kept and the filtered ones (generated within the staleness bound)
    dropped_stale: int
    filtered: int
    too_long: int
    ready_at_start: int  # scored groups waiting when the step began
    waited_s: float  # trainer time spent waiting for groups


def prompts_per_round(num_prompts_per_step: int, batch_multiplier: float, dynamic_sampling: bool) -> int:
    """Prompts drawn per generation round of a synchronous step: the step's need times
    algo.dynamic_sampling.batch_multiplier, rounded up (NeMo-RL's grpo.batch_multiplier), so that the groups
    DAPO keeps usually fill the step in one round. Without dynamic sampling, exactly the need. Asynchronous
    steps draw algo.async.prompts_per_request at a time whatever the multiplier; this sets only how many
    prompts a step may examine (the same rounds' worth) and what its `filter/generation_rounds` counts."""
    if not dynamic_sampling:
        return num_prompts_per_step
    return max(num_prompts_per_step, math.ceil(round(num_prompts_per_step * batch_multiplier, 6)))


def version_lags(completions: Sequence[Completion], policy_version: int) -> torch.Tensor:
    """Per sample: how many versions its oldest token is behind `policy_version` (the policy updated)."""
    return torch.tensor([policy_version - (min(c.versions) if c.versions else policy_version) for c in completions],
                        dtype=torch.long)


def multi_version_tokens(completions: Sequence[Completion]) -> tuple[int, int]:
    """(samples, tokens) generated under more than one policy version (an update landed mid-request)."""
    spans = [c for c in completions if c.versions and min(c.versions) != max(c.versions)]
    return len(spans), sum(len(c.token_ids) for c in spans)


class ProducerStopped(RuntimeError):
    pass


class RolloutProducer:
    """See the module docstring. `score` turns (records, completions) into (Scores, shaped [N]) and runs
    in the scorer thread; `encode` is the trainer's prompt encoder (records -> records, ids, dropped)."""

    def __init__(self, *, engine: RolloutEngine, source: PromptSource, params: SamplingParams,
                 encode: Callable[[Sequence[PromptRecord]], tuple[list[PromptRecord], list[list[int]], int]],
                 score: Callable[[Sequence[PromptRecord], Sequence[Completion]], tuple[Scores, torch.Tensor]],
                 capacity: int, request_prompts: int, first_seq: int, seed: Callable[[int], int]) -> None:
        self.engine, self.source, self.params = engine, source, params
        self.encode, self.score, self.seed = encode, score, seed
        self.capacity, self.request_prompts = max(1, capacity), max(1, request_prompts)
        self.next_seq = first_seq  # the next group the trainer takes
        self._drawn = first_seq  # prompts drawn so far (the next one's seq)
        self._ready: dict[int, Group] = {}
        self._cond = threading.Condition()
        self._to_score: queue.Queue = queue.Queue()
        self._error: Optional[BaseException] = None
        self._stopping = False
        self._busy_s = 0.0  # engine time: inside generate calls (finished ones)
        self._busy_since: Optional[float] = None  # start of the generate call in flight
        self._failures: list[str] = []  # "<reward>: <reason>" of verifier errors / time-outs, for the events log
        self._threads = [threading.Thread(target=self._guard, args=(self._generate_loop,), name="prorl-generator",
                                          daemon=True),
                         threading.Thread(target=self._guard, args=(self._score_loop,), name="prorl-scorer",
                                          daemon=True)]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "RolloutProducer":
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> Optional[BaseException]:
        """Stop drawing prompts and drop what waits to be scored; wait for the scorer's batch in hand (its
        verifiers have limits of their own). A generate call in flight is not waited for: closing the engines
        ends it, and its thread then ends. Returns the error that stopped the producer, if one did."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        while True:
            try:
                self._to_score.get_nowait()
            except queue.Empty:
                break
        self._to_score.put(None)
        self._threads[1].join(timeout_s)
        return self._error

    def engine_busy_seconds(self) -> float:
        """Seconds spent in generate calls so far, the one in flight included."""
        with self._cond:
            running = time.perf_counter() - self._busy_since if self._busy_since is not None else 0.0
            return self._busy_s + running

    # ------------------------------------------------------------------ threads
    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as e:  # noqa: BLE001  handed to the trainer, which raises it in its own thread
            with self._cond:
                if not self._stopping and self._error is None:
                    self._error = e
                self._cond.notify_all()

    def _room(self) -> int:
        return self.capacity - (self._drawn - self.next_seq)

    def _generate_loop(self) -> None:
        while True:
            # a whole request's room (or the whole buffer's): a slot freed one group at a time must not turn
            # into a request of one prompt that the engines then work on almost idle
            full = min(self.request_prompts, self.capacity)
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._room() >= full)
                if self._stopping:
                    return
                take = min(self.request_prompts, self._room())
                version = self.engine.version
            groups, records = [], []
            for _ in range(take):  # one at a time: each group knows the source's state after its prompt
                rec = self.source.next_prompts(1)
                groups.append(Group(seq=self._drawn, data_state=copy.deepcopy(self.source.state_dict()),
                                    generated_at=version))
                records += rec
                with self._cond:
                    self._drawn += 1
            kept, ids, _ = self.encode(records)
            live = [g for g, rec in zip(groups, records) if any(r is rec for r in kept)]
            for g, p in zip(live, ids):
                g.prompt_ids = p
            with self._cond:
                self._busy_since = time.perf_counter()
            try:
                completions = self.engine.generate(ids, self.params, seeds=[self.seed(g.seq) for g in live]) \
                    if ids else []
            finally:
                with self._cond:
                    self._busy_s += time.perf_counter() - self._busy_since
                    self._busy_since = None
            for c in completions:  # an engine that records no versions: every token is the request's version
                if c.versions is None:
                    c.versions = [version] * len(c.token_ids)
            self._to_score.put((groups, live, kept, completions))

    def _score_loop(self) -> None:
        n = self.params.n
        while True:
            item = self._to_score.get()
            if item is None:
                return
            groups, live, records, completions = item
            if completions:
                scores, shaped = self.score(records, completions)
                for j, g in enumerate(live):
                    g.completions = [dataclasses.replace(c, prompt_index=0) for c in completions[j * n:(j + 1) * n]]
                    g.shaped = shaped[j * n:(j + 1) * n]
                    g.scores = _slice_scores(scores, j * n, (j + 1) * n)
            with self._cond:
                self._failures += scores.failures if completions else []
                self._ready.update({g.seq: g for g in groups})
                self._cond.notify_all()

    # ------------------------------------------------------------------ the trainer's side
    def take(self, *, policy_version: int, max_staleness: int, need: int, budget: int,
             has_signal: Callable[[torch.Tensor], bool]) -> Taken:
        """Groups in stream order until `need` are kept or `budget` prompts were examined. A group whose
        oldest token is more than `max_staleness` versions behind `policy_version` is dropped (counted,
        never trained on); `has_signal(shaped)` False filters it (dynamic sampling)."""
        kept: list[Group] = []
        examined: list[Group] = []
        scored: list[Group] = []
        stale = filtered = too_long = 0
        waited = 0.0
        with self._cond:
            ready_at_start = sum(1 for s in self._ready if not self._ready[s].too_long)
        while len(kept) < need and len(examined) < budget:
            t0 = time.perf_counter()
            g = self._next_group()
            waited += time.perf_counter() - t0
            examined.append(g)
            if g.too_long:
                too_long += 1
            elif policy_version - g.oldest_version > max_staleness:
                stale += 1
            elif not has_signal(g.shaped):
                filtered += 1
                scored.append(g)
            else:
                kept.append(g)
                scored.append(g)
        return Taken(kept, examined, scored, stale, filtered, too_long, ready_at_start, waited)

    def _next_group(self) -> Group:
        with self._cond:
            self._cond.wait_for(lambda: self.next_seq in self._ready or self._error is not None or self._stopping)
            if self._error is not None:
                raise self._error
            if self.next_seq not in self._ready:
                raise ProducerStopped("the rollout producer was stopped")
            g = self._ready.pop(self.next_seq)
            self.next_seq += 1
            self._cond.notify_all()  # room for the generator
            return g

    def drain_failures(self) -> list[str]:
        with self._cond:
            out, self._failures = self._failures, []
            return out

    def occupancy(self) -> tuple[int, int]:
        """(groups scored and waiting, groups drawn and not yet scored)."""
        with self._cond:
            return len(self._ready), self._drawn - self.next_seq - len(self._ready)


def _slice_scores(s: Scores, a: int, b: int) -> Scores:
    return Scores(rewards=s.rewards[a:b], correct=s.correct[a:b], lengths=s.lengths[a:b],
                  truncated=s.truncated[a:b], statuses=s.statuses[a:b], domains=s.domains[a:b],
                  info=s.info[a:b], failures=[])


class SerializedRewards:
    """A reward suite shared by the producer's scorer and the trainer's validation: one batch at a time."""

    def __init__(self, suite: Any) -> None:
        self.suite, self._lock = suite, threading.Lock()

    def score_batch(self, names: Sequence[str], inputs: Sequence[Any]) -> list[Any]:
        with self._lock:
            return self.suite.score_batch(names, inputs)

    def close(self, timeout_s: float = 60.0) -> None:
        """After the batch being scored (a scorer the producer's stop did not wait out), or `timeout_s`."""
        held = self._lock.acquire(timeout=timeout_s)
        try:
            self.suite.close()
        finally:
            if held:
                self._lock.release()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.suite, name)
