"""Validation: sample several responses per held-out prompt and report pass@k (ProRL §3.2 protocol)."""

from __future__ import annotations

from typing import Sequence

import torch

from nemo_prorl.algo.passk import pass_at_k
from nemo_prorl.config.schema import ValidationConfig
from nemo_prorl.data.records import PromptRecord
from nemo_prorl.rollout.base import RolloutEngine, SamplingParams
from nemo_prorl.rewards import RewardSuite
from nemo_prorl.trainer.scoring import per_domain_means, reward_health, score_completions


def validate(
    engine: RolloutEngine,
    tokenizer,
    rewards: RewardSuite,
    records: Sequence[PromptRecord],
    prompt_ids: Sequence[Sequence[int]],
    cfg: ValidationConfig,
    *,
    max_tokens: int,
    seed: int,
) -> dict[str, float]:
    n = cfg.num_samples_per_prompt
    params = SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=max_tokens,
                            stop_token_ids=(tokenizer.eos_token_id,), seed=seed)
    completions = engine.generate(prompt_ids, params)
    scores = score_completions(records, completions, tokenizer, rewards)
    correct = scores.correct.view(len(records), n)
    num_correct = correct.sum(dim=1)
    samples = torch.full_like(num_correct, n)
    out: dict[str, float] = {"val/reward": float(scores.rewards.mean()),
                             "val/response_length": float(scores.lengths.float().mean()),
                             **reward_health(scores.statuses, scores.domains, scores.info, prefix="val/reward")}
    for k in cfg.pass_k:
        per_prompt = pass_at_k(samples, num_correct, k)
        out[f"val/pass@{k}"] = float(per_prompt.mean())
        domains = [r.domain for r in records]
        out.update(per_domain_means(per_prompt, domains, f"val/pass@{k}"))
    return out
