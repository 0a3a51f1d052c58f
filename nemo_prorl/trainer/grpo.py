"""The ProRL trainer: one loop of named, timed phases.

  generate -> score -> filter (DAPO rounds) -> advantages -> logprobs -> update -> sync_weights
  -> validate (every k steps) -> reset_reference (schedule or stall) -> checkpoint

Asynchronous steps (algo.async.max_staleness > 0) are a scheduling policy around the same loop: a producer
(trainer/producer.py) generates, scores and filters ahead of the trainer, and the generate phase takes
the groups a step needs from its buffer; the phases after it are the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig

from nemo_prorl.algo.advantages import ADVANTAGE_ESTIMATORS
from nemo_prorl.algo.loss import policy_loss
from nemo_prorl.algo.offpolicy import mismatch_metrics
from nemo_prorl.algo.reset import reference_reset_decision
from nemo_prorl.algo.sampling import groups_with_signal, take_groups
from nemo_prorl.cluster.rewards import reward_suite
from nemo_prorl.config.schema import ProRLConfig, async_config
from nemo_prorl.data.records import PromptRecord, PromptSource
from nemo_prorl.data.templates import encode_prompts
from nemo_prorl.policy.base import Batch, LossFn, PolicyBackend
from nemo_prorl.confine import sandbox_confines
from nemo_prorl.rollout.base import Completion, RolloutEngine, SamplingParams, prompt_seed
from nemo_prorl.trainer.batching import build_batch, minibatch_plan, select_rows
from nemo_prorl.trainer.checkpoint import (CheckpointError, read_checkpoint_file, remove_stale_temporaries,
                                           save_checkpoint, set_aside_newer, set_rng_state)
from nemo_prorl.trainer.logger import MetricsLogger, truncate_logs
from nemo_prorl.trainer.phases import PhaseTimer
from nemo_prorl.trainer.producer import (RolloutProducer, SerializedRewards, Taken, multi_version_tokens,
                                         prompts_per_round, version_lags)
from nemo_prorl.trainer.scoring import (Scores, generation_metrics, length_penalty_step, score_completions,
                                        shaped_rewards)
from nemo_prorl.trainer.trackers import open_trackers, tracker_ids_for
from nemo_prorl.trainer.validate import HackingWatch, validate
from nemo_prorl.weight_sync import sync_weights

log = logging.getLogger("nemo_prorl")


@dataclasses.dataclass
class StepGroups:
    """The groups kept for one step's update, after dynamic sampling."""

    prompt_ids: list[list[int]] = dataclasses.field(default_factory=list)
    completions: list[Completion] = dataclasses.field(default_factory=list)
    rewards: list[torch.Tensor] = dataclasses.field(default_factory=list)  # one [n] tensor per group
    versions_behind: Optional[torch.Tensor] = None  # async: [N] version lag of each sample (oldest token)
    seqs: list[int] = dataclasses.field(default_factory=list)  # async: each group's place in the data stream

    def __len__(self) -> int:
        return len(self.prompt_ids)


def microbatch_loss(logp: torch.Tensor, entropy: Optional[torch.Tensor], micro: Batch,
                    **loss_args: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`policy_loss` on one micro-batch's rows. With one update per step the sampling policy is the
    current one: old logprobs are the current ones, detached, and their forward pass is skipped."""
    old = micro["old_logprobs"] if "old_logprobs" in micro else logp.detach()
    return policy_loss(logp, old, micro["advantages"], micro["response_mask"], ref_logprobs=micro.get("ref_logprobs"),
                       rollout_logprobs=micro.get("rollout_logprobs"), entropy=entropy, **loss_args)


def _seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + p) % (2**62)
    return h


class ProRLTrainer:
    def __init__(self, cfg: ProRLConfig, resolved: DictConfig, *, policy: PolicyBackend, engine: RolloutEngine,
                 tokenizer: Any, source: PromptSource, out_dir: Path) -> None:
        self.cfg, self.resolved = cfg, resolved
        self.policy, self.engine, self.tokenizer, self.source = policy, engine, tokenizer, source
        self.out_dir = out_dir
        self.step = 0
        self.last_reset_step = 0
        self.val_history: list[float] = []  # validation metric since the last reference reset
        self.hacking = HackingWatch(cfg.trainer.hacking_alarm, cfg.validation.metric)  # train vs val, per domain
        self.val_records, self.val_prompt_ids, _ = self.encode_prompts(source.validation_set())
        self.use_reference = cfg.algo.kl_coef > 0
        self.stop_ids = (tokenizer.eos_token_id,)
        self.rewards = reward_suite(cfg)  # in this process, or a worker actor on every node
        self.reward_failures: list[str] = []  # reasons of verifier errors/time outs since the last log
        self.num_resets = 0
        self.skipped_streak = 0  # consecutive steps whose update was skipped
        self.last_validation: dict[str, float] = {}
        self.tracker_ids: dict[str, str] = {}  # W&B/MLflow run ids (trainer state): a resume continues them
        self.resumed_stage: Optional[str] = None
        # Asynchronous steps (trainer/producer.py): None when synchronous (max_staleness 0)
        self.max_staleness = async_config(cfg).max_staleness
        self.producer: Optional[RolloutProducer] = None
        # The version of the policy's weights: the number of updates synced to the engines (a step that kept no
        # group changes nothing, so it is no version). Engines record it on every token they generate.
        self.policy_version = 0
        self.prompts_consumed = 0  # prompts the steps took from the stream (trained, filtered, dropped, too long)
        self.consumed_data_state: Optional[dict[str, Any]] = None  # async: the source's state after them
        self.histograms: dict[str, torch.Tensor] = {}  # this step's, for TensorBoard
        self._mark: Optional[tuple[float, float]] = None  # async: (wall, engine busy seconds) at the last take
        if self.max_staleness > 0:
            self.rewards = SerializedRewards(self.rewards)  # the producer's scorer and validation share it

    # ---------------------------------------------------------------- prompts
    def encode_prompts(self, records: Sequence[PromptRecord]) -> tuple[list[PromptRecord], list[list[int]], int]:
        return encode_prompts(self.tokenizer, records, self.cfg.data.max_prompt_length)

    # ---------------------------------------------------------------- phases: generate, score, filter
    def collect_groups(self, step: int, timer: PhaseTimer) -> tuple[StepGroups, dict[str, float]]:
        """The step's groups (DAPO-filtered), then ProRL v2's length penalty for this step on the kept ones."""
        kept, metrics = self.take_groups(step, timer) if self.producer is not None else self.sample_groups(step, timer)
        kept.rewards, shaping = length_penalty_step(kept.rewards, kept.completions, self.cfg.reward,
                                                    self.cfg.rollout.max_response_length, step)
        return kept, {**metrics, **shaping}

    def sample_groups(self, step: int, timer: PhaseTimer) -> tuple[StepGroups, dict[str, float]]:
        """A synchronous step's generate, score and filter phases: DAPO's rounds until it has its groups."""
        a, ro = self.cfg.algo, self.cfg.rollout
        n, need = a.num_generations_per_prompt, a.num_prompts_per_step
        ds = a.dynamic_sampling
        draw = prompts_per_round(need, ds.batch_multiplier, ds.enabled)  # DAPO: extra prompts for the filter
        kept = StepGroups()
        gen_groups = uniform_groups = rounds = dropped_prompts = 0
        round_scores: list[Scores] = []
        for rnd in range(ds.max_generation_rounds if ds.enabled else 1):
            with timer("generate"):
                records, prompt_ids, dropped = self.encode_prompts(self.source.next_prompts(draw))
                dropped_prompts += dropped
                self.prompts_consumed += draw
                completions = self.engine.generate(prompt_ids, self.sampling_params(_seed(self.cfg.trainer.seed, step,
                                                                                          rnd)))
            with timer("score"):
                scores = score_completions(records, completions, self.tokenizer, self.rewards)
                shaped = shaped_rewards(scores, self.cfg.reward, ro.max_response_length).view(len(records), n)
            with timer("filter"):
                signal = groups_with_signal(shaped, ds.reward_atol)
                uniform_groups += int((~signal).sum())
                keep = signal if ds.enabled else torch.ones_like(signal)
                for g in take_groups(len(kept), keep, need).tolist():
                    kept.prompt_ids.append(prompt_ids[g])
                    kept.rewards.append(shaped[g])
                    kept.completions.extend(dataclasses.replace(c, prompt_index=len(kept) - 1)
                                            for c in completions[g * n : (g + 1) * n])
            rounds += 1
            gen_groups += len(records)
            round_scores.append(scores)
            self.reward_failures += scores.failures
            if len(kept) >= need:
                break
        return kept, self.generation_metrics(round_scores, generated_groups=gen_groups, uniform_groups=uniform_groups,
                                             kept=len(kept), rounds=float(rounds), dropped_prompts=dropped_prompts)

    def sampling_params(self, seed: int) -> SamplingParams:
        a, ro = self.cfg.algo, self.cfg.rollout
        return SamplingParams(n=a.num_generations_per_prompt, temperature=ro.temperature, top_p=ro.top_p,
                              max_tokens=ro.max_response_length, stop_token_ids=self.stop_ids, seed=seed,
                              stop=tuple(ro.stop))

    # ---------------------------------------------------------------- asynchronous steps (trainer/producer.py)
    def start_producer(self) -> None:
        """Asynchronous steps: the engines learn the policy's version (a sync at the step resumed from), then
        the producer starts drawing prompts where the steps so far stopped taking them."""
        a, ac = self.cfg.algo, async_config(self.cfg)
        sync_weights(self.policy, self.engine, bucket_mb=self.cfg.rollout.weight_sync_bucket_mb,
                     version=self.policy_version)
        ro = self.cfg.rollout

        def score(records: Sequence[PromptRecord], completions: Sequence[Completion]) -> tuple[Scores, torch.Tensor]:
            scores = score_completions(records, completions, self.tokenizer, self.rewards)
            return scores, shaped_rewards(scores, self.cfg.reward, ro.max_response_length)

        self.producer = RolloutProducer(
            engine=self.engine, source=self.source, params=self.sampling_params(0), encode=self.encode_prompts,
            score=score, capacity=ac.max_buffered_groups or self.max_staleness * a.num_prompts_per_step,
            request_prompts=ac.prompts_per_request or a.num_prompts_per_step, first_seq=self.prompts_consumed,
            seed=lambda seq: prompt_seed(_seed(self.cfg.trainer.seed, ASYNC_SEED_STREAM, seq), 0)).start()
        self._mark = None

    def take_groups(self, step: int, timer: PhaseTimer) -> tuple[StepGroups, dict[str, float]]:
        """The generate phase of an asynchronous step: the groups it needs, from the producer's buffer."""
        a, ds = self.cfg.algo, self.cfg.algo.dynamic_sampling
        need = a.num_prompts_per_step
        per_round = prompts_per_round(need, ds.batch_multiplier, ds.enabled)
        budget = per_round * (ds.max_generation_rounds if ds.enabled else 1)  # prompts examined, as sync rounds
        with timer("generate"):
            taken = self.producer.take(
                policy_version=self.policy_version, max_staleness=self.max_staleness, need=need, budget=budget,
                has_signal=lambda r: not ds.enabled or bool(groups_with_signal(r.view(1, -1), ds.reward_atol)[0]))
        kept = StepGroups()
        for g in taken.kept:
            kept.prompt_ids.append(g.prompt_ids)
            kept.rewards.append(g.shaped)
            kept.seqs.append(g.seq)
            kept.completions.extend(dataclasses.replace(c, prompt_index=len(kept) - 1) for c in g.completions)
        kept.versions_behind = version_lags(kept.completions, self.policy_version)
        self.prompts_consumed = taken.examined[-1].seq + 1
        self.consumed_data_state = taken.examined[-1].data_state
        self.reward_failures += self.producer.drain_failures()
        scored = [g.scores for g in taken.scored]  # not the stale groups: an older policy's figures
        metrics = self.generation_metrics(scored, generated_groups=len(scored), uniform_groups=taken.filtered,
                                          kept=len(kept), rounds=len(taken.examined) / per_round,
                                          dropped_prompts=taken.too_long)
        return kept, {**metrics, **self.async_metrics(taken, kept)}

    def async_metrics(self, taken: Taken, kept: StepGroups) -> dict[str, float]:
        """Version lag of the trained samples, the buffer, and who waited for whom since the last step."""
        now, busy = time.perf_counter(), self.producer.engine_busy_seconds()
        wall = now - self._mark[0] if self._mark else 0.0
        engine_busy = busy - self._mark[1] if self._mark else 0.0
        self._mark = (now, busy)
        lags = kept.versions_behind
        spans, span_tokens = multi_version_tokens(kept.completions)
        ready, in_flight = self.producer.occupancy()
        if len(lags):
            self.histograms["async/version_lag"] = lags
        return {
            "async/version_lag_mean": float(lags.float().mean()) if len(lags) else 0.0,
            "async/version_lag_max": float(lags.max()) if len(lags) else 0.0,
            "async/dropped_stale_groups": float(taken.dropped_stale),
            "async/buffer_groups": float(taken.ready_at_start),  # scored groups waiting when the step began
            "async/buffer_groups_after": float(ready),
            "async/in_flight_groups": float(in_flight),
            "async/multi_version_samples": float(spans),
            "async/multi_version_tokens": float(span_tokens),
            # between two steps' takes: the share of time the engines had no request, and the trainer waited
            "async/engine_idle_frac": max(0.0, 1.0 - engine_busy / wall) if wall > 0 else 0.0,
            "async/trainer_idle_frac": min(1.0, taken.waited_s / wall) if wall > 0 else 0.0,
        }

    def generation_metrics(self, scores: Sequence[Scores], **counts: Any) -> dict[str, float]:
        return generation_metrics(scores, need=self.cfg.algo.num_prompts_per_step,
                                  skipped_rows=self.source.skipped_rows(), **counts)

    # ---------------------------------------------------------------- phases: advantages, logprobs, update
    def make_batch(self, groups: StepGroups) -> dict[str, torch.Tensor]:
        a = self.cfg.algo
        batch = build_batch(groups.prompt_ids, groups.completions, self.tokenizer.pad_token_id)
        if self.cfg.rollout.routing_replay and "routed_experts" not in batch:  # never replay silently nothing
            raise RuntimeError(f"rollout.routing_replay=true, but the rollout engine (rollout.engine="
                               f"{self.cfg.rollout.engine!r}) returned no routed experts")
        rewards = torch.stack(groups.rewards)  # [G, n]
        token_counts = batch["response_mask"].sum(dim=1).view_as(rewards)
        estimator = ADVANTAGE_ESTIMATORS.get(a.advantage_estimator, "algo.advantage_estimator")
        batch["advantages"] = estimator(rewards, eps=a.advantage_eps, token_counts=token_counts).flatten()
        return batch

    def minibatch_plan(self, num_groups: int, step: int) -> list[torch.Tensor]:
        """The rows of each update of the step (see batching.minibatch_plan), seeded by the step."""
        a = self.cfg.algo
        gen = torch.Generator().manual_seed(_seed(self.cfg.trainer.seed, step, 7))
        return minibatch_plan(num_groups, a.num_generations_per_prompt, a.num_prompts_per_minibatch,
                              a.num_epochs_per_step, gen)

    def loss_fn(self, mb: Batch) -> LossFn:
        """The ProRL loss for one mini-batch; its normalisers are the mini-batch totals, so micro-batching
        does not change the result. A partial of a module-level function, so it pickles to workers."""
        a, rc = self.cfg.algo, self.cfg.algo.rollout_correction
        return functools.partial(
            microbatch_loss, clip_eps_low=a.clip_eps_low, clip_eps_high=a.clip_eps_high, clip_ratio_c=a.clip_ratio_c,
            global_num_tokens=mb["response_mask"].sum(), global_num_seqs=float(mb["response_mask"].shape[0]),
            horizon=self.cfg.rollout.max_response_length, loss_agg_mode=a.loss_agg_mode, kl_coef=a.kl_coef,
            kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef, rollout_correction=rc.mode,
            tis_cap=rc.tis_cap, icepop_low=rc.icepop_low, icepop_high=rc.icepop_high, seq_geo_mask=rc.seq_geo_mask,
            geo_mask_low=rc.geo_mask_low, geo_mask_high=rc.geo_mask_high)

    def update(self, batch: dict[str, torch.Tensor], plan: list[torch.Tensor]) -> dict[str, float]:
        T = self.cfg.rollout.temperature
        totals: dict[str, float] = {}
        for i, rows in enumerate(plan):
            mb = select_rows(batch, rows)
            if i == 0:  # the first update runs at the sampling policy: its own forward pass is pi_old
                mb.pop("old_logprobs", None)
            m = self.policy.train_minibatch(mb, self.loss_fn(mb), temperature=T)
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + v
        return {f"actor/{k}": v / len(plan) for k, v in totals.items()}

    def logprobs_phase(self, batch: dict[str, torch.Tensor], plan: list[torch.Tensor], step: int) -> dict[str, float]:
        """Old logprobs (for the updates after the first), reference logprobs (KL), and the check of the
        rollout engine against the policy on the sampled tokens."""
        T, every = self.cfg.rollout.temperature, self.cfg.rollout.mismatch_check_every_n_steps
        check = every > 0 and step % every == 0
        B = batch["response_mask"].shape[0]
        need = torch.ones(B, dtype=torch.bool)
        if self.cfg.algo.num_epochs_per_step == 1:
            # The first update starts from the policy that sampled (asynchronous steps: the proximal policy,
            # which the clip is relative to): the old logprobs of its rows are its own forward pass,
            # detached (microbatch_loss), so this pass skips them. With several epochs
            # every row is updated again later and needs them.
            need[plan[0]] = False
        rows = torch.nonzero(need).flatten()
        policy_lp = None
        if len(plan) > 1 and len(rows):
            policy_lp = self.policy.logprobs(select_rows(batch, rows), temperature=T)
            batch["old_logprobs"] = torch.zeros_like(batch["rollout_logprobs"]).index_copy(0, rows, policy_lp)
        elif check:  # the loss then uses the update's own (identical) forward pass, as without the check
            rows = torch.arange(B)
            policy_lp = self.policy.logprobs(batch, temperature=T)
        if self.use_reference:
            batch["ref_logprobs"] = self.policy.logprobs(batch, temperature=T, reference=True)
        if not check:
            return {}
        # on the rows whose policy logprobs this step computed anyway (all but the first update's)
        mask = batch["response_mask"][rows]
        m = mismatch_metrics(policy_lp, batch["rollout_logprobs"][rows], mask, mask.sum().clamp(min=1))
        out = {f"mismatch/{k}": float(v) for k, v in m.items()}
        if "routed_experts" in batch:
            # Routing replay: what it buys, measured on the same rows by a forward that routes anew (one more
            # logprob pass on the steps that check).
            plain = select_rows({k: v for k, v in batch.items() if k != "routed_experts"}, rows)  # no routing copy
            m = mismatch_metrics(self.policy.logprobs(plain, temperature=T), batch["rollout_logprobs"][rows], mask,
                                 mask.sum().clamp(min=1))
            out.update({f"mismatch/no_replay_{k}": float(v) for k, v in m.items()})
        return out

    def train_step(self, step: int, timer: PhaseTimer) -> dict[str, float]:
        groups, metrics = self.collect_groups(step, timer)
        if self.producer is None:
            self.engine.sleep()  # colocated engines give the memory to the update; the sync wakes them
        if len(groups) == 0:  # every group was uniform for max_generation_rounds: nothing to learn from
            metrics["actor/update_skipped"] = 1.0
            return metrics
        with timer("advantages"):
            batch = self.make_batch(groups)
        plan = self.minibatch_plan(len(groups), step)
        metrics["actor/num_updates"] = float(len(plan))
        with timer("logprobs"):
            metrics.update(self.logprobs_phase(batch, plan, step))
        with timer("update"):
            metrics.update(self.update(batch, plan))
        with timer("sync_weights"):
            # the engines' weights become the next version (a request in flight goes on with them)
            stats = sync_weights(self.policy, self.engine, bucket_mb=self.cfg.rollout.weight_sync_bucket_mb,
                                 version=self.policy_version + 1)
        self.policy_version += 1
        metrics["sync/megabytes"] = stats.num_bytes / 2**20
        # bytes that crossed nodes to reach an engine (0 when every node holds a whole replica)
        metrics["sync/cross_node_megabytes"] = stats.cross_node_bytes / 2**20
        return metrics

    # ---------------------------------------------------------------- phases: validate, reset_reference
    def validate(self, step: int, timer: PhaseTimer) -> dict[str, float]:
        v = self.cfg.validation
        with timer("validate"):
            out = validate(self.engine, self.tokenizer, self.rewards, self.val_records, self.val_prompt_ids, v,
                           max_tokens=v.max_response_length or self.cfg.rollout.max_response_length,
                           seed=_seed(self.cfg.trainer.seed, 999))  # same seed each time: comparable numbers
        self.val_history.append(out[f"val/{v.metric}"])
        return {**out, **self.hacking.observe_validation(step, out)}

    def maybe_reset_reference(self, step: int, timer: PhaseTimer, logger: MetricsLogger) -> bool:
        """Hard-reset the reference (and, if configured, the optimizer) when the schedule or the stall rule
        says so, or when a user asked for it with `prorl reset-reference RUN_DIR`."""
        r = self.cfg.algo.reference_reset
        decision = reference_reset_decision(
            step=step, last_reset_step=self.last_reset_step, every_n_steps=r.every_n_steps,
            val_history=self.val_history, stall_patience=r.stall_patience, stall_min_delta=r.stall_min_delta)
        reason, reset_optimizer = decision.reason, r.reset_optimizer
        request = self.out_dir / RESET_REQUEST
        if request.is_file():
            asked = json.loads(request.read_text() or "{}")
            reason, reset_optimizer = "manual: prorl reset-reference", asked.get("reset_optimizer", reset_optimizer)
            request.unlink()
        elif not decision.reset:
            return False
        self.hard_reset(step, timer, logger, reason=reason, reset_optimizer=reset_optimizer)
        return True

    def hard_reset(self, step: int, timer: PhaseTimer, logger: MetricsLogger, *, reason: str,
                   reset_optimizer: bool) -> None:
        with timer("reset_reference"):
            self.policy.reset_reference()
            if reset_optimizer:
                self.policy.reset_optimizer()
        self.last_reset_step, self.val_history = step, []
        self.num_resets += 1
        logger.event(step, "reference_reset", reason=reason, reset_optimizer=reset_optimizer,
                     num_resets=self.num_resets)

    # ---------------------------------------------------------------- checkpoint, resume, preemption
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "last_reset_step": self.last_reset_step, "val_history": self.val_history,
                "num_resets": self.num_resets, "skipped_streak": self.skipped_streak,
                # async: where the steps stopped taking prompts; those in flight are drawn again on resume
                "data": self.consumed_data_state if self.producer is not None and self.consumed_data_state is not None
                else self.source.state_dict(),
                "prompts_consumed": self.prompts_consumed, "policy_version": self.policy_version,
                "stage_name": self.cfg.stage_name, "hacking_alarm": self.hacking.state_dict(),
                "trackers": dict(self.tracker_ids)}

    def restore(self, ckpt: Path) -> None:
        """Continue exactly where the checkpoint left off: policy (optimizer, reference), counters, data
        position and RNG states. The policy's weights were already loaded from the checkpoint folder."""
        try:
            self.policy.load_state(ckpt)
        except Exception as e:  # a damaged file raises several types, from this process or a worker
            raise CheckpointError(f"resume: checkpoint {ckpt}: the policy state cannot be loaded: {e}") from e
        st = read_checkpoint_file(ckpt, "trainer_state.json")
        self.step, self.last_reset_step, self.val_history = st["step"], st["last_reset_step"], st["val_history"]
        self.num_resets, self.skipped_streak = st.get("num_resets", 0), st.get("skipped_streak", 0)
        self.prompts_consumed = st.get("prompts_consumed", 0)
        self.policy_version = st.get("policy_version", self.step)
        self.hacking.load_state_dict(st.get("hacking_alarm"))
        self.source.load_state_dict(st["data"])
        set_rng_state(read_checkpoint_file(ckpt, "rng_state.pt"))
        self.resumed_stage = st.get("stage_name")
        self.tracker_ids = tracker_ids_for(st.get("trackers", {}), ckpt, self.out_dir)  # a fork: new runs
        self.last_validation = read_checkpoint_file(ckpt, "metrics.json")

    def checkpoint(self, logger: MetricsLogger, reason: str) -> Path:
        t = self.cfg.trainer
        timer = PhaseTimer()
        with timer("checkpoint"):
            path = save_checkpoint(self.out_dir / "checkpoints", self.step, policy=self.policy,
                                   tokenizer=self.tokenizer, resolved_config=self.resolved,
                                   trainer_state=self.trainer_state(), keep_last=t.keep_last_checkpoints,
                                   metrics=self.last_validation, keep_best_metric=t.keep_best_metric)
        logger.event(self.step, "checkpoint", path=str(path), reason=reason,
                     seconds=round(timer.metrics()["time/checkpoint"], 3))
        return path

    # ---------------------------------------------------------------- the loop
    def run_step(self, timer: PhaseTimer, logger: MetricsLogger) -> dict[str, float]:
        """One step: train, validate (every k steps), reset the reference if due."""
        t, v = self.cfg.trainer, self.cfg.validation
        metrics = self.train_step(self.step, timer)
        self.hacking.observe_step(metrics)
        if metrics["filter/shortfall_groups"] > 0:
            logger.event(self.step, "groups_short", kept=int(metrics["filter/kept_groups"]),
                         planned=self.cfg.algo.num_prompts_per_step, updates=int(metrics.get("actor/num_updates", 0)),
                         rounds=int(metrics["filter/generation_rounds"]))
        last = self.step == t.num_steps
        if v.every_n_steps > 0 and self.val_records and (self.step % v.every_n_steps == 0 or last):
            self.last_validation = self.validate(self.step, timer)
            metrics.update(self.last_validation)
        metrics["reference/reset"] = float(self.maybe_reset_reference(self.step, timer, logger))
        skipped = metrics.get("actor/update_skipped", 0.0) > 0 and "actor/loss" in metrics
        self.skipped_streak = self.skipped_streak + 1 if skipped else 0
        metrics.update(timer.metrics())
        # asynchronous steps generate during the whole step (their generate phase only waits for groups)
        gen_time = metrics["time/step"] - metrics.get("time/validate", 0.0) if self.producer is not None \
            else metrics.get("time/generate", 0.0)
        metrics["throughput/gen_tokens_per_s"] = metrics["throughput/generated_tokens"] / max(gen_time, 1e-9)
        return metrics

    def fit(self) -> dict[str, Any]:
        t = self.cfg.trainer
        resumed_at = self.step
        tidied = self._tidy_for_resume() if resumed_at else {}
        logger = MetricsLogger(self.out_dir, total_steps=t.num_steps, start_step=self.step,
                               tensorboard=t.tensorboard, progress_bar=t.progress_bar,
                               trackers=open_trackers(self.cfg, self.resolved, self.out_dir, self.tracker_ids))
        logger.restore_alarms(self.hacking.alarmed)  # a resumed run's bar names what is still raised
        if tidied:
            logger.event(self.step, "resume_cleanup", **tidied)
        validations: dict[int, dict[str, float]] = {}
        try:
            with StopSignals() as stop:
                self._begin(logger, resumed_at, validations)
                if self.max_staleness > 0:
                    self.start_producer()
                while self.step < t.num_steps:
                    self.step += 1
                    metrics = self.run_step(PhaseTimer(), logger)
                    if "val/reward" in metrics:
                        validations[self.step] = self.last_validation
                    # logged before the checkpoint: a kill in between re-runs this step, never loses its row
                    logger.log(self.step, metrics)
                    for name, values in self.histograms.items():
                        logger.histogram(self.step, name, values)
                    self.histograms = {}
                    logger.advance(self.step, metrics)
                    self._report_reward_failures(logger)
                    unhealthy = self.skipped_streak >= t.max_consecutive_skipped_updates
                    if (self.step % t.checkpoint_every_n_steps == 0 or self.step == t.num_steps or stop.signal
                            or unhealthy):
                        path = self.checkpoint(logger, stop.signal or ("unhealthy" if unhealthy else "schedule"))
                    if stop.signal:  # Slurm preemption or time limit: saved; the launcher requeues the job
                        (self.out_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": self.step,
                                                                                 "signal": stop.signal}))
                        logger.event(self.step, "preempted", signal=stop.signal, checkpoint=str(path))
                        break
                    if unhealthy:
                        logger.event(self.step, "stopped_unhealthy", skipped_steps=self.skipped_streak)
                        raise TrainingHealthError(
                            f"{self.skipped_streak} steps in a row skipped their update (NaN or inf in the loss or "
                            f"gradients); stopped with a checkpoint at {path}")
        finally:
            if self.producer is not None:
                error, self.producer = self.producer.stop(), None
                if error is not None:  # raised already, unless another error stopped the run first: say it
                    log.warning("the rollout producer had stopped with: %s: %s", type(error).__name__, error)
            logger.close()
            self.rewards.close()
        return {"validations": validations, "out_dir": str(self.out_dir), "preempted": stop.signal}

    def _tidy_for_resume(self) -> dict[str, Any]:
        """Before a resumed run logs or saves anything: checkpoints newer than the one resumed from belong to
        an abandoned timeline (a rollback) and are set aside with their log rows; rows logged after the
        checkpoint run again; a torn last log line is dropped; temporary folders of interrupted checkpoint
        writes are removed. Returns what was done, for the events log (and says it here)."""
        ckpts = self.out_dir / "checkpoints"
        tidied: dict[str, Any] = {}
        if removed := remove_stale_temporaries(ckpts):
            tidied["removed_partial_checkpoints"] = removed
        aside = set_aside_newer(ckpts, self.step)
        if aside is not None:
            tidied["abandoned_checkpoints"] = sorted(p.name for p in aside.iterdir())
            tidied["moved_to"] = str(aside)
        tidied.update(truncate_logs(self.out_dir, self.step, dropped_to=aside))
        for k, v in tidied.items():  # rows of the steps that run again are routine; the rest is news
            log.log(logging.INFO if k.endswith("_rows_dropped") else logging.WARNING, "resume at step %d: %s: %s",
                    self.step, k, v)
        return tidied

    def _begin(self, logger: MetricsLogger, resumed_at: int, validations: dict[int, dict[str, float]]) -> None:
        """A fresh run validates the starting policy; a resumed one logs the event, and a resume into a new
        stage starts it with a hard reset (ProRL Appendix E: every run begins with one)."""
        sb = self.cfg.reward.sandbox
        if sb.backend == "local" and sb.allow_unconfined and not sandbox_confines():
            # once per run, in events.jsonl beside the log's warning: generated code was not confined
            logger.event(self.step, "sandbox_unconfined", reason="no user/mount/PID namespaces on this machine")
        if not resumed_at:
            if self.cfg.validation.every_n_steps > 0 and self.val_records:
                timer = PhaseTimer()
                validations[self.step] = self.last_validation = self.validate(self.step, timer)
                logger.log(self.step, {**validations[self.step], **timer.metrics()})
            return
        stage = self.cfg.stage_name
        logger.event(self.step, "resumed", num_resets=self.num_resets, stage=stage)
        if stage != self.resumed_stage:
            self.hard_reset(self.step, PhaseTimer(), logger, reason=f"stage {stage} starts (was {self.resumed_stage})",
                            reset_optimizer=self.cfg.algo.reference_reset.reset_optimizer)

    def _report_reward_failures(self, logger: MetricsLogger) -> None:
        if self.reward_failures:  # verifier errors/time outs: counted in metrics, examples here
            logger.event(self.step, "reward_failures", count=len(self.reward_failures),
                         examples=self.reward_failures[:3])
            self.reward_failures = []


class TrainingHealthError(RuntimeError):
    pass


class StopSignals:
    """SIGTERM and SIGUSR1 (Slurm preemption, `--signal`) ask the loop to checkpoint after the current
    step and exit cleanly; a second signal of the same kind is not caught again."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


ASYNC_SEED_STREAM = 0xA5  # async prompts' seeds: (run seed, this, place in the stream), apart from the steps'
PREEMPTED_MARKER = "PREEMPTED"
RESET_REQUEST = "RESET_REFERENCE"  # written by `prorl reset-reference RUN_DIR`; read at the next step's end
