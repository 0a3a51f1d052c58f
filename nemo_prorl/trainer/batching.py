"""Turn prompts and completions into the padded tensors the policy backends take (see policy/base.py)."""

from __future__ import annotations

from typing import Sequence

import torch

from nemo_prorl.algo.sampling import minibatch_sizes
from nemo_prorl.rollout.base import Completion


def build_batch(
    prompt_ids: Sequence[Sequence[int]], completions: Sequence[Completion], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """One row per completion: prompt left-padded to the longest prompt, response right-padded."""
    B = len(completions)
    P = max(len(prompt_ids[c.prompt_index]) for c in completions)
    R = max(max(len(c.token_ids) for c in completions), 1)
    input_ids = torch.full((B, P + R), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.float32)
    rollout_logprobs = torch.zeros((B, R), dtype=torch.float32)
    for row, c in enumerate(completions):
        p, r = prompt_ids[c.prompt_index], c.token_ids
        input_ids[row, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        input_ids[row, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[row, P - len(p) : P + len(r)] = 1
        response_mask[row, : len(r)] = 1.0
        rollout_logprobs[row, : len(r)] = torch.tensor(c.logprobs, dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "rollout_logprobs": rollout_logprobs,
    }


def select_rows(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items()}


def minibatch_plan(num_groups: int, group_size: int, groups_per_minibatch: int, num_epochs: int,
                   generator: torch.Generator) -> list[torch.Tensor]:
    """The rows of each update of a step, in order: whole groups, shuffled by `generator` every epoch, in
    the mini-batches `minibatch_sizes` gives (the planned size, or the kept groups spread evenly over
    fewer updates when DAPO's rounds fell short)."""
    plan = []
    for _ in range(num_epochs):
        order = torch.randperm(num_groups, generator=generator)
        for groups in torch.split(order, minibatch_sizes(num_groups, groups_per_minibatch)):
            plan.append((groups.unsqueeze(1) * group_size + torch.arange(group_size)).flatten())
    return plan
