"""Score completions with the reward each prompt's record names, and apply the configured shaping."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from nemo_prorl.algo.shaping import overlong_penalty, stop_properly_penalty
from nemo_prorl.config.schema import RewardConfig
from nemo_prorl.data.records import PromptRecord
from nemo_prorl.rewards import RewardInput, safe_score
from nemo_prorl.rollout.base import Completion


@dataclass
class Scores:
    rewards: torch.Tensor  # [N] task reward, before shaping
    correct: torch.Tensor  # [N] bool
    lengths: torch.Tensor  # [N] response tokens
    truncated: torch.Tensor  # [N] bool, cut at the length limit
    statuses: Counter
    domains: list[str]


def score_completions(records: Sequence[PromptRecord], completions: Sequence[Completion], tokenizer) -> Scores:
    rewards, correct, statuses, domains = [], [], Counter(), []
    for c in completions:
        rec = records[c.prompt_index]
        text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        res = safe_score(rec.reward, RewardInput(
            response=text, ground_truth=rec.ground_truth, finish_reason=c.finish_reason, metadata=rec.metadata))
        rewards.append(res.reward)
        correct.append(bool(res.correct) if res.correct is not None else res.reward >= 1.0)
        statuses[res.status] += 1
        domains.append(rec.domain)
    return Scores(
        rewards=torch.tensor(rewards, dtype=torch.float32),
        correct=torch.tensor(correct, dtype=torch.bool),
        lengths=torch.tensor([len(c.token_ids) for c in completions]),
        truncated=torch.tensor([c.finish_reason == "length" for c in completions]),
        statuses=statuses,
        domains=domains,
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
