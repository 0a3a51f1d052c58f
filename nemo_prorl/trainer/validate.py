"""Validation: the evaluation of `prorl eval` (trainer/evaluation.py) on the run's held-out set, with
ProRL's §3.2 sampling (several samples per prompt at temperature 0.6, top-p 0.95), reported as flat metrics;
`validation.metric` among them feeds the reference-reset stall rule and, per domain, the reward-hacking
alarm (HackingWatch), which compares it with the training reward."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import torch

from nemo_prorl.algo.hacking import divergence_streak, hacking_flags
from nemo_prorl.config.schema import HackingAlarmConfig, ValidationConfig
from nemo_prorl.data.records import PromptRecord
from nemo_prorl.trainer.evaluation import run_eval, task_of, validation_metrics
from nemo_prorl.rewards import RewardSuite
from nemo_prorl.rollout.base import RolloutEngine, SamplingParams
from nemo_prorl.trainer.logger import ALARM_PREFIX, CLEARED_PREFIX
from nemo_prorl.trainer.scoring import per_domain_means

log = logging.getLogger(__name__)

# `reward/<name>` and `val/<metric>/<name>` figures that are not a domain's (scoring.reward_health's, the mean)
NOT_DOMAINS = frozenset({"mean", "error_frac", "timeout_frac"})


def validate(
    engine: RolloutEngine,
    tokenizer: Any,
    rewards: RewardSuite,
    records: Sequence[PromptRecord],
    prompt_ids: Sequence[Sequence[int]],
    cfg: ValidationConfig,
    *,
    max_tokens: int,
    seed: int,
) -> dict[str, float]:
    params = SamplingParams(n=cfg.num_samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_tokens=max_tokens, stop_token_ids=(tokenizer.eos_token_id,), seed=seed)
    result = run_eval(engine, tokenizer, rewards, records, prompt_ids, [task_of(r) for r in records], params)
    n = result.num_samples
    # `val/reward/<domain>` beside training's `reward/<domain>`: validation.metric=reward is then per domain too
    by_domain = per_domain_means(result.rewards.reshape(-1), [r.domain for r in result.records for _ in range(n)],
                                 "val/reward")
    return {**validation_metrics(result, cfg.pass_k), **by_domain}


def _domains(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """{domain: value} of the one-level keys `<prefix><domain>` (deeper keys are a domain's extra figures)."""
    return {k[len(prefix):]: float(v) for k, v in metrics.items()
            if k.startswith(prefix) and "/" not in k[len(prefix):] and k[len(prefix):] not in NOT_DOMAINS}


class HackingWatch:
    """The trainer's side of the reward-hacking alarm (the trend test is algo/hacking.py). Per domain it keeps,
    at each validation, the training reward (the mean of the steps' `reward/<domain>` since the previous
    validation) and validation's `val/<metric>/<domain>`; the last `patience + 1` of them are enough for the
    test. `state_dict()` goes into the checkpoint's trainer state, so a resumed run goes on with the same
    history (and the same partial window of steps) as the run that stopped."""

    def __init__(self, cfg: HackingAlarmConfig, metric: str) -> None:
        if cfg.patience < 0 or not cfg.min_delta >= 0:
            raise ValueError(f"trainer.hacking_alarm: patience must be >= 0 and min_delta >= 0, got "
                             f"patience={cfg.patience}, min_delta={cfg.min_delta}")
        self.patience, self.min_delta, self.metric = cfg.patience, cfg.min_delta, metric
        self.history: dict[str, list[list[Optional[float]]]] = {}  # domain -> [[train, val], ...], oldest first
        self.window: dict[str, list[float]] = {}  # domain -> [sum, count] of the steps' rewards since the last one
        self.alarmed: list[str] = []  # domains flagged at the last validation

    def observe_step(self, metrics: dict[str, float]) -> None:
        """A training step's metrics: its `reward/<domain>` means join the current window."""
        if self.patience == 0:
            return
        for d, v in _domains(metrics, "reward/").items():
            if math.isfinite(v):
                acc = self.window.setdefault(d, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + v, acc[1] + 1

    def observe_validation(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """A validation's metrics: closes the window, appends a pair for every domain it reports or has a
        history, and returns `alarm/reward_hacking/<domain>` (1.0 raised, 0.0 not) for every domain validation
        reports, plus `alarm/reward_hacking_cleared/<domain>` = 1.0 for each domain raised at the previous
        validation and not now. The cleared figure comes from this watch's state, which a checkpoint keeps:
        the logger, built afresh by a resumed run, knows nothing of the alarms raised before it."""
        if self.patience == 0:
            return {}
        val = _domains(metrics, f"val/{self.metric}/")
        # A row for each known domain at every validation, None where a figure is missing: the rows of all
        # domains then line up by validation, and a missing figure ends the domain's streak (algo/hacking.py)
        # instead of the domain's validations on either side of the gap being compared as if adjacent.
        for d in sorted({*val, *self.history}):
            acc = self.window.get(d)
            train = acc[0] / acc[1] if acc else None  # None: no training step since the last validation
            v = val.get(d)
            self.history.setdefault(d, []).append([train, v if v is not None and math.isfinite(v) else None])
            del self.history[d][:-(self.patience + 1)]
            if all(p[1] is None for p in self.history[d]):  # gone from validation: forget it (bounded state)
                del self.history[d]
        self.window = {}
        before, self.alarmed = self.alarmed, []
        domains = sorted(self.history)
        if domains:
            train_t, val_t = self._tensors(domains)
            flags = hacking_flags(train_t, val_t, self.patience, self.min_delta).tolist()
            self.alarmed = [d for d, f in zip(domains, flags) if f]
        if self.alarmed:
            self._warn(step, domains, train_t, val_t)
        out = {f"{ALARM_PREFIX}{d}": float(d in self.alarmed) for d in sorted(val)}
        out.update({f"{CLEARED_PREFIX}{d}": 1.0 for d in before if d not in self.alarmed})
        return out

    def _warn(self, step: int, domains: list[str], train_t: torch.Tensor, val_t: torch.Tensor) -> None:
        streaks = divergence_streak(train_t, val_t, self.min_delta).tolist()
        for d, s in zip(domains, streaks):
            if d in self.alarmed:
                pairs = ", ".join(f"{t if t is None else round(t, 4)}/{round(v, 4) if v is not None else v}"
                                  for t, v in self.history[d])
                log.warning("step %d: possible reward hacking in domain %r: the training reward rose while "
                            "val/%s/%s fell at %d validations in a row (train/val at the last ones: %s); "
                            "look at its responses: the verifier may be gamed", step, d, self.metric, d, s, pairs)

    def _tensors(self, domains: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[V, D] float64 of the kept pairs, NaN where a domain has no figure. Every known domain gets a row at
        every validation (observe_validation), so row i is the same validation for all of them; a domain
        first seen lately has a shorter history, right-aligned, with NaN before its first validation."""
        v = max(len(self.history[d]) for d in domains)
        out = torch.full((2, v, len(domains)), math.nan, dtype=torch.float64)
        for j, d in enumerate(domains):
            h = self.history[d]
            for i, pair in enumerate(h, start=v - len(h)):
                for c, x in enumerate(pair):
                    if x is not None:
                        out[c, i, j] = x
        return out[0], out[1]

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "window": self.window, "alarmed": self.alarmed}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """From `state_dict()`; None (a checkpoint from before the alarm) starts an empty history."""
        state = state or {}
        self.history = {d: [list(p) for p in h] for d, h in state.get("history", {}).items()}
        self.window = {d: list(a) for d, a in state.get("window", {}).items()}
        self.alarmed = list(state.get("alarmed", []))
