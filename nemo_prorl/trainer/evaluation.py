"""The evaluation both `prorl eval` and the trainer's validation run: sample n responses per prompt, score
them with the rewards the rows name, and report pass@k (the unbiased estimator, `algo/passk.py`) per task,
per domain and overall (ProRL §3.2: pass@1 averaged over n samples; pass@k curves).

It sits in the trainer's package, below both of its users: trainer/validate.py imports it, and so does the
command (eval/runner.py), which adds loading checkpoints and benchmarks and the report (eval/report.py)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from nemo_prorl.algo.passk import pass_at_k
from nemo_prorl.data.records import PromptRecord
from nemo_prorl.rewards import RewardSuite
from nemo_prorl.rollout.base import RolloutEngine, SamplingParams
from nemo_prorl.trainer.scoring import reward_health, score_completions


@dataclass
class EvalTask:
    """One benchmark: its prompts as records and as token ids (the same order)."""

    name: str
    records: list[PromptRecord]
    prompt_ids: list[list[int]]
    dropped_long_prompts: int = 0


@dataclass
class EvalResult:
    """Per prompt and sample: correctness, reward and length, plus which task each prompt belongs to."""

    tasks: list[str]  # [P] task name of each prompt
    records: list[PromptRecord]  # [P]
    correct: torch.Tensor  # [P, n] bool
    rewards: torch.Tensor  # [P, n]
    lengths: torch.Tensor  # [P, n] response tokens
    statuses: list[str]  # [P * n] verifier status
    info: list[dict[str, float]] = field(default_factory=list)  # [P * n]
    dropped: dict[str, int] = field(default_factory=dict)  # per task: prompts over the length limit
    token_ids: list[list[int]] = field(default_factory=list)  # [P * n] the responses, prompt-major

    @property
    def num_samples(self) -> int:
        return int(self.correct.shape[1])


def task_of(record: PromptRecord) -> str:
    """The benchmark a validation record came from: its blend source, else (the synthetic digit tasks)
    its domain."""
    return record.source or record.domain


def run_eval(engine: RolloutEngine, tokenizer: Any, rewards: RewardSuite, records: Sequence[PromptRecord],
             prompt_ids: Sequence[Sequence[int]], task_names: Sequence[str], params: SamplingParams,
             dropped: dict[str, int] | None = None) -> EvalResult:
    """Generate `params.n` samples for every prompt in one engine call (one batch keeps the engine full),
    then score them concurrently. `task_names[i]` is the benchmark of prompt i."""
    completions = engine.generate(prompt_ids, params)
    scores = score_completions(records, completions, tokenizer, rewards)
    P, n = len(records), params.n
    return EvalResult(tasks=list(task_names), records=list(records), correct=scores.correct.view(P, n),
                      rewards=scores.rewards.view(P, n), lengths=scores.lengths.view(P, n),
                      statuses=scores.statuses, info=scores.info, dropped=dict(dropped or {}),
                      token_ids=[c.token_ids for c in completions])


def run_tasks(engine: RolloutEngine, tokenizer: Any, rewards: RewardSuite, tasks: Sequence[EvalTask],
              params: SamplingParams) -> EvalResult:
    """`run_eval` over several benchmarks at once."""
    return run_eval(engine, tokenizer, rewards, [r for t in tasks for r in t.records],
                    [p for t in tasks for p in t.prompt_ids], [t.name for t in tasks for _ in t.records], params,
                    {t.name: t.dropped_long_prompts for t in tasks})


def curve_ks(n: int, pass_k: Sequence[int]) -> list[int]:
    """k = 1, 2, 4, ... up to n, plus n and the configured ks: the x axis of a pass@k curve."""
    ks = {1 << i for i in range(n.bit_length()) if (1 << i) <= n} | {n} | {k for k in pass_k if k <= n}
    return sorted(ks)


def _pass_rows(correct: torch.Tensor, ks: Sequence[int]) -> dict[int, torch.Tensor]:
    """pass@k of each prompt (rows of `correct`), for every k."""
    n = correct.shape[1]
    num_correct = correct.sum(dim=1)
    samples = torch.full_like(num_correct, n)
    return {k: pass_at_k(samples, num_correct, k) for k in ks}


def _group_stats(idx: list[int], per_k: dict[int, torch.Tensor], res: EvalResult) -> dict[str, Any]:
    i = torch.tensor(idx, dtype=torch.long)
    n = res.num_samples
    rows = [s for p in idx for s in range(p * n, (p + 1) * n)]
    st = [res.statuses[r] for r in rows]
    return {
        "num_prompts": len(idx),
        "pass@k": {str(k): float(v[i].mean()) for k, v in per_k.items()},
        "reward_mean": float(res.rewards[i].mean()),
        "response_length_mean": float(res.lengths[i].float().mean()),
        "error_frac": st.count("error") / len(st),
        "timeout_frac": st.count("timeout") / len(st),
    }


def summarize(res: EvalResult, ks: Sequence[int]) -> dict[str, Any]:
    """pass@k for every k in `ks`, overall, per domain and per task. A domain's `pass@k` is the mean over
    all its prompts (a task with more prompts weighs more); `pass@k_task_mean` is the mean over its
    tasks, as the "average" columns of the papers' result tables weigh every benchmark alike."""
    per_k = _pass_rows(res.correct, ks)
    by_task: dict[str, list[int]] = defaultdict(list)
    by_domain: dict[str, list[int]] = defaultdict(list)
    for p, (t, rec) in enumerate(zip(res.tasks, res.records)):
        by_task[t].append(p)
        by_domain[rec.domain].append(p)
    tasks = {}
    for t, idx in by_task.items():
        tasks[t] = {"domain": res.records[idx[0]].domain, **_group_stats(idx, per_k, res),
                    "dropped_long_prompts": res.dropped.get(t, 0),
                    "per_prompt": [[res.records[p].uid, int(res.correct[p].sum())] for p in idx]}
    domains = {}
    for d, idx in sorted(by_domain.items()):
        parts: dict[str, list[int]] = defaultdict(list)  # the domain's prompts by task (a task may mix domains)
        for p in idx:
            parts[res.tasks[p]].append(p)
        means = {k: [float(per_k[k][torch.tensor(rows)].mean()) for rows in parts.values()] for k in ks}
        domains[d] = {**_group_stats(idx, per_k, res),
                      "pass@k_task_mean": {str(k): sum(v) / len(v) for k, v in means.items()}}
    return {
        "num_samples_per_prompt": res.num_samples,
        "ks": list(ks),
        "overall": _group_stats(list(range(len(res.records))), per_k, res),
        "domains": domains,
        "tasks": tasks,
    }


def validation_metrics(res: EvalResult, pass_k: Sequence[int], prefix: str = "val") -> dict[str, float]:
    """The flat metrics the trainer logs: `val/pass@k`, `val/pass@k/<domain>`, `val/reward`,
    `val/response_length`, verifier health, and `val/task/<task>/pass@k` where tasks are not domains."""
    s = summarize(res, pass_k)
    o = s["overall"]
    out: dict[str, float] = {f"{prefix}/reward": o["reward_mean"], f"{prefix}/response_length": o["response_length_mean"],
                             **reward_health(res.statuses, [r.domain for r in res.records for _ in range(res.num_samples)],
                                             res.info, prefix=f"{prefix}/reward")}
    for k in pass_k:
        out[f"{prefix}/pass@{k}"] = o["pass@k"][str(k)]
        out.update({f"{prefix}/pass@{k}/{d}": v["pass@k"][str(k)] for d, v in s["domains"].items()})
        out.update({f"{prefix}/task/{t}/pass@{k}": v["pass@k"][str(k)] for t, v in sorted(s["tasks"].items())
                    if t != v["domain"]})
    return out
