"""The reward contract: `score(RewardInput) -> RewardResult`. A reward never raises: an exception or a
timeout becomes a result with status "error"/"timeout", reward 0, and the reason, which is distinct from
a wrong answer (status "ok", reward 0).

Rewards are registered as factories taking the `reward` config section, so limits (sandbox, time outs)
come from the one config. `RewardSuite` holds one instance per name and scores a batch concurrently:
a reward with its own `score_batch` (the code sandbox, the math process pool) gets its rows in one call,
the others run on a thread pool.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Protocol, Sequence

from nemo_prorl.registry import Registry

Status = Literal["ok", "error", "timeout"]


@dataclass(frozen=True)
class RewardInput:
    response: str
    ground_truth: str
    prompt: str = ""
    finish_reason: str = "stop"  # "stop" or "length" (truncated)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardResult:
    reward: float
    correct: Optional[bool] = None  # binary verdict where the domain has one (pass@k counts these)
    status: Status = "ok"
    reason: str = ""
    # Extra per-response figures the trainer averages per domain (e.g. ifeval "loose", code "tests_passed").
    info: dict[str, float] = field(default_factory=dict)


def failed(status: Status, reason: str) -> RewardResult:
    return RewardResult(0.0, correct=False, status=status, reason=reason)


class RewardFn(Protocol):
    def score(self, inp: RewardInput) -> RewardResult: ...


# Entries are factories: (RewardConfig or None) -> RewardFn. None means the schema defaults.
REWARDS: Registry[Callable[[Any], RewardFn]] = Registry("reward")


def checked(res: Any, name: str = "reward") -> RewardResult:
    """`res` if it is a RewardResult whose reward and extra figures are finite numbers, else a verifier
    error that says why. A NaN reward would otherwise pass silently: DAPO's spread test (NaN > atol is
    False) drops its group as uniform, and without DAPO it turns the advantages and the loss into NaN."""
    if not isinstance(res, RewardResult):
        return failed("error", f"{name} returned {type(res).__name__}, not RewardResult")
    bad = [f"reward={res.reward!r}"] if not _finite(res.reward) else []
    bad += [f"info[{k!r}]={v!r}" for k, v in res.info.items() if not _finite(v)]
    if bad:
        return failed("error", f"{name} returned a non-finite or non-numeric value: {', '.join(bad)}")
    return res


def _finite(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _guarded(fn: Callable[[RewardInput], RewardResult], inp: RewardInput, name: str = "reward") -> RewardResult:
    try:
        return checked(fn(inp), name)
    except Exception as e:  # noqa: BLE001  the contract is that scoring never takes the trainer down
        return failed("error", f"{type(e).__name__}: {e}")


class RewardSuite:
    """One instance of each reward a run uses, built lazily from the `reward` config section."""

    def __init__(self, cfg: Any = None, num_workers: Optional[int] = None) -> None:
        self.cfg = cfg
        self.num_workers = num_workers or (getattr(cfg, "num_workers", None) or 4)
        self._fns: dict[str, RewardFn] = {}
        self._lock = threading.Lock()
        self._threads: Optional[ThreadPoolExecutor] = None
        if cfg is not None:  # a run's suite: an unusable sandbox uid lock folder fails the launch, naming it
            from nemo_prorl.confine import check_sandbox_uids

            check_sandbox_uids()

    def get(self, name: str) -> RewardFn:
        with self._lock:
            if name not in self._fns:
                self._fns[name] = REWARDS.get(name)(self.cfg)
            return self._fns[name]

    def score(self, name: str, inp: RewardInput) -> RewardResult:
        try:
            fn = self.get(name)
        except Exception as e:  # noqa: BLE001  an unknown name is recorded per row, not raised
            return failed("error", f"{type(e).__name__}: {e}")
        return _guarded(fn.score, inp, name)

    def score_batch(self, names: Sequence[str], inputs: Sequence[RewardInput]) -> list[RewardResult]:
        """Score row i with reward names[i]. Rows are grouped by reward; batch-capable rewards get their
        rows in one call, the rest run on the thread pool. Order is preserved; nothing raises."""
        if len(names) != len(inputs):
            raise ValueError(f"{len(names)} reward names for {len(inputs)} inputs")
        out: list[Optional[RewardResult]] = [None] * len(inputs)
        by_name: dict[str, list[int]] = defaultdict(list)
        for i, n in enumerate(names):
            by_name[n].append(i)
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.num_workers, thread_name_prefix="reward")
        # Batch-capable rewards (own pools: sandbox, math workers) get one call each, all running at once
        # and alongside the rows of the other rewards.
        batches, singles = [], []
        for name, rows in by_name.items():
            try:
                fn = self.get(name)
            except Exception as e:  # noqa: BLE001
                for i in rows:
                    out[i] = failed("error", f"{type(e).__name__}: {e}")
                continue
            if hasattr(fn, "score_batch"):
                batches.append((name, rows, self._threads.submit(fn.score_batch, [inputs[i] for i in rows])))
            else:
                singles += [(i, self._threads.submit(self.score, name, inputs[i])) for i in rows]
        for name, rows, fut in batches:
            try:
                results = list(fut.result())
                if len(results) != len(rows):
                    raise RuntimeError(f"{name}.score_batch returned {len(results)} results for {len(rows)} rows")
            except Exception as e:  # noqa: BLE001
                results = [failed("error", f"{type(e).__name__}: {e}")] * len(rows)
            for i, r in zip(rows, results):
                out[i] = checked(r, name)
        for i, f in singles:
            out[i] = f.result()
        return out  # type: ignore[return-value]

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None
        for fn in self._fns.values():
            close = getattr(fn, "close", None)
            if close is not None:
                close()
        self._fns.clear()


_DEFAULT = RewardSuite()


def get_reward(name: str) -> RewardFn:
    """The reward with the schema's default settings (shared, built once)."""
    return _DEFAULT.get(name)


def safe_score(name: str, inp: RewardInput) -> RewardResult:
    """Score with the named reward at default settings; an unknown name or any exception is recorded."""
    return _DEFAULT.score(name, inp)
