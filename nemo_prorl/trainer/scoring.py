"""Score completions with the reward each prompt's record names (concurrently, through a RewardSuite),
apply the configured shaping, and turn the results into per-domain metrics."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from nemo_prorl.algo.shaping import overlong_penalty, stop_properly_penalty
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
    r = scores.rewards
    if cfg.stop_properly.enabled:
        r = stop_properly_penalty(r, scores.truncated, truncated_reward_scale=cfg.stop_properly.truncated_reward_scale)
    if cfg.overlong.enabled:
        r = r + overlong_penalty(scores.lengths, max_response_length=max_response_length,
                                 buffer_length=cfg.overlong.buffer_length, penalty_factor=cfg.overlong.penalty_factor)
    return r


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
