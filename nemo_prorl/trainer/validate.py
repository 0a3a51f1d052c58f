"""Validation: the evaluation of `prorl eval` (nemo_prorl/eval/core.py) on the run's held-out set, with
ProRL's §3.2 sampling (several samples per prompt at temperature 0.6, top-p 0.95), reported as flat metrics;
`validation.metric` among them feeds the reference-reset stall rule."""

from __future__ import annotations

from typing import Any, Sequence

from nemo_prorl.config.schema import ValidationConfig
from nemo_prorl.data.records import PromptRecord
from nemo_prorl.eval.core import run_eval, task_of, validation_metrics
from nemo_prorl.rewards import RewardSuite
from nemo_prorl.rollout.base import RolloutEngine, SamplingParams


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
    return validation_metrics(result, cfg.pass_k)
