"""Score completions with the reward each prompt's record names (concurrently, through a RewardSuite),
apply the configured shaping, and turn the results into per-domain metrics."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from nemo_prorl.algo.shaping import (cosine_length_penalty, length_penalised, length_penalty_active, overlong_penalty,
                                     stop_properly_penalty)
from nemo_prorl.config.schema import RewardConfig
from nemo_prorl.data.records import PromptRecord
from nemo_prorl.rewards import RewardInput, RewardSuite
from nemo_prorl.rollout.base import Completion


@dataclass
class Scores:
    rewards: torch.Tensor  # [N] task reward, before shaping
    correct: torch.Tensor  # [N] bool
    lengths: torch.Tensor  # [N] response tokens
    truncated: torch.Tensor  # [N] bool, cut at the length limit
    statuses: list[str]  # [N] "ok", "error" (verifier failed), "timeout" (verifier ran out of time)
    domains: list[str]
    info: list[dict[str, float]] = field(default_factory=list)  # [N] extra per-response figures
    failures: list[str] = field(default_factory=list)  # "<reward>: <reason>" of error/timeout rows


def _prompt_text(rec: PromptRecord) -> str:
    users = [m["content"] for m in rec.messages if m.get("role") == "user"]
    return users[-1] if users else ""


def score_completions(records: Sequence[PromptRecord], completions: Sequence[Completion], tokenizer,
                      suite: RewardSuite) -> Scores:
    names, inputs = [], []
    for c in completions:
        rec = records[c.prompt_index]
        names.append(rec.reward)
        inputs.append(RewardInput(response=tokenizer.decode(c.token_ids, skip_special_tokens=True),
                                  ground_truth=rec.ground_truth, prompt=_prompt_text(rec),
                                  finish_reason=c.finish_reason, metadata=rec.metadata))
    results = suite.score_batch(names, inputs)
    return Scores(
        rewards=torch.tensor([r.reward for r in results], dtype=torch.float32),
        correct=torch.tensor([bool(r.correct) if r.correct is not None else r.reward >= 1.0 for r in results],
                             dtype=torch.bool),
        lengths=torch.tensor([len(c.token_ids) for c in completions]),
        truncated=torch.tensor([c.finish_reason == "length" for c in completions]),
        statuses=[r.status for r in results],
        domains=[records[c.prompt_index].domain for c in completions],
        info=[r.info for r in results],
        failures=[f"{n}: {r.reason}" for n, r in zip(names, results) if r.status != "ok"],
    )


def shaped_rewards(scores: Scores, cfg: RewardConfig, max_response_length: int) -> torch.Tensor:
    """The task rewards with the shaping DAPO's filter sees: stop-properly, then DAPO's overlong punishment.
    ProRL v2's length penalty comes after the filter (length_penalty_step)."""
    r = scores.rewards
    if cfg.stop_properly.enabled:
        r = stop_properly_penalty(r, scores.truncated, truncated_reward_scale=cfg.stop_properly.truncated_reward_scale)
    if cfg.overlong.enabled:
        r = r + overlong_penalty(scores.lengths, max_response_length=max_response_length,
                                 buffer_length=cfg.overlong.buffer_length, penalty_factor=cfg.overlong.penalty_factor)
    return r


def length_penalty_step(rewards: list[torch.Tensor], completions: Sequence[Completion], cfg: RewardConfig,
                        max_response_length: int, step: int) -> tuple[list[torch.Tensor], dict[str, float]]:
    """ProRL v2's scheduled cosine length penalty (reward.length_penalty) for the groups a step trains on:
    `rewards` one [n] tensor of shaped_rewards per kept group, `completions` theirs in the same order, `step`
    the step that takes them (asynchronous steps included: the producer scores without it, so a group's
    rewards depend on the step that trains on it, not on when it was scored). It comes after DAPO's filter:
    "Dynamic Sampling discards prompts with group responses with all 1 or 0" (the ProRL v2 blog), and
    a group kept for a length spread alone would get +-1 advantages from GRPO's (std + eps) normalisation.
    Returns the rewards and `reward/length_penalty/{active,mean}` (the mean change over the responses)."""
    lp = cfg.length_penalty
    if not lp.enabled:
        return rewards, {}
    active = length_penalty_active(step, start_step=lp.start_step, on_steps=lp.on_steps, off_steps=lp.off_steps)
    if not active or not rewards:
        return rewards, {"reward/length_penalty/active": float(active), "reward/length_penalty/mean": 0.0}
    before = torch.cat(rewards)
    # the figures score_completions gives Scores.lengths and Scores.truncated
    lengths = torch.tensor([len(c.token_ids) for c in completions])
    truncated = torch.tensor([c.finish_reason == "length" for c in completions])
    penalty = cosine_length_penalty(lengths, max_response_length=max_response_length, min_value=lp.min_value,
                                    max_value=lp.max_value)
    after = length_penalised(before, penalty, truncated, rewarded_only=lp.apply_to == "correct")
    return list(after.split([len(r) for r in rewards])), {"reward/length_penalty/active": 1.0,
                                                           "reward/length_penalty/mean": float((after - before).mean())}


def per_domain_means(values: torch.Tensor, domains: Sequence[str], prefix: str) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for v, d in zip(values.tolist(), domains):
        groups[d].append(v)
    return {f"{prefix}/{d}": sum(vs) / len(vs) for d, vs in sorted(groups.items())}


def reward_health(statuses: Sequence[str], domains: Sequence[str], info: Sequence[dict[str, float]],
                  prefix: str = "reward") -> dict[str, float]:
    """Verifier failures (kept apart from wrong answers) and the rewards' extra figures, per domain:
    `reward/error_frac`, `reward/timeout_frac`, `reward/<domain>/<info key>`."""
    n = max(len(statuses), 1)
    counts = Counter(statuses)
    out = {f"{prefix}/error_frac": counts["error"] / n, f"{prefix}/timeout_frac": counts["timeout"] / n}
    sums: dict[str, list[float]] = defaultdict(list)
    for d, extra in zip(domains, info):
        for k, v in extra.items():
            sums[f"{prefix}/{d}/{k}"].append(float(v))
    out.update({k: sum(vs) / len(vs) for k, vs in sorted(sums.items())})
    return out


def generation_metrics(scores: Sequence[Scores], *, need: int, generated_groups: int, uniform_groups: int, kept: int,
                       rounds: float, dropped_prompts: int, skipped_rows: int) -> dict[str, float]:
    """A step's figures of what it generated (every scored response, kept or not); `need`: the groups a step
    trains on (algo.num_prompts_per_step), `skipped_rows`: the data source's."""
    out: dict[str, float] = {}
    domains = [d for s in scores for d in s.domains]
    if scores:  # (none when every prompt an asynchronous step took was too long)
        rewards, lengths = torch.cat([s.rewards for s in scores]), torch.cat([s.lengths for s in scores]).float()
        out = {"reward/mean": float(rewards.mean()), "response_length/mean": float(lengths.mean()),
               "response_length/max": float(lengths.max()),
               "response_length/truncated_frac": float(torch.cat([s.truncated for s in scores]).float().mean()),
               **per_domain_means(rewards, domains, "reward")}
    return {
        **out,
        # Groups whose rewards were all equal (no learning signal), out of all generated this step.
        "filter/filtered_group_frac": uniform_groups / max(generated_groups, 1),
        "filter/kept_groups": float(kept),
        # groups the step planned for but did not get (DAPO's rounds fell short); see minibatch_sizes
        "filter/shortfall_groups": float(need - kept),
        "filter/generation_rounds": rounds,
        "data/dropped_long_prompts": float(dropped_prompts),
        "data/skipped_rows": float(skipped_rows),
        "throughput/generated_tokens": float(sum(int(s.lengths.sum()) for s in scores)),
        **reward_health([x for s in scores for x in s.statuses], domains, [x for s in scores for x in s.info]),
    }
