"""Turn prompts and completions into the padded tensors the policy backends take (see policy/base.py)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from nemo_prorl.algo.sampling import minibatch_sizes
from nemo_prorl.policy.microbatch import filler_routing
from nemo_prorl.rollout.base import Completion


def build_batch(
    prompt_ids: Sequence[Sequence[int]], completions: Sequence[Completion], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """One row per completion: prompt left-padded to the longest prompt, response right-padded. Completions
    with routed experts (routing replay) add `routed_experts`, uint8 (int16 past 256 experts)
    [B, P + R, layers, k] aligned with `input_ids`; positions without a recorded routing (padding, each response's last token) hold a fixed
    spread of experts (policy/microbatch.filler_routing over the experts the completions name): padding
    dispatched to experts 0..k-1 alone would all land on the first expert-parallel rank."""
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
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "rollout_logprobs": rollout_logprobs,
    }
    routed = routed_experts(prompt_ids, completions, P, R)
    if routed is not None:
        batch["routed_experts"] = routed
    return batch


def routed_experts(prompt_ids: Sequence[Sequence[int]], completions: Sequence[Completion], P: int,
                   R: int) -> Optional[torch.Tensor]:
    """The completions' routings laid out like `input_ids` (see build_batch); None when none has one.
    A batch mixing completions with and without routing is refused: part of it would not be replayed."""
    have = [c.routed_experts is not None for c in completions]
    if not any(have):
        return None
    if not all(have):
        raise ValueError("rollout.routing_replay: some completions carry routed experts and some do not")
    layers, k = completions[0].routed_experts.shape[1:]
    # the model's expert count is not known here: the experts the rollouts name stand for it
    named = max((int(c.routed_experts.max()) + 1 for c in completions if c.routed_experts.numel()), default=0)
    # The batch's largest tensor by far (layers x k ids per position: 384 for Qwen3-30B-A3B), so one byte an
    # id where the experts fit (up to 256: Qwen3-MoE has 128); the completions keep int16
    dtype = torch.uint8 if max(named, k) <= 256 else torch.int16
    out = filler_routing(len(completions), P + R, layers, k, max(named, k), dtype)
    for row, c in enumerate(completions):
        p, e = len(prompt_ids[c.prompt_index]), c.routed_experts
        if tuple(e.shape) != (p + len(c.token_ids) - 1, layers, k):
            raise ValueError(f"routed experts of shape {tuple(e.shape)} for a prompt of {p} and a response of "
                             f"{len(c.token_ids)} tokens (expected [{p + len(c.token_ids) - 1}, {layers}, {k}])")
        out[row, P - p : P - p + e.shape[0]] = e.to(dtype)
    return out


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
