"""Dynamic micro-batching of variable-length rollouts for the Megatron backend (pure tensor code).

A mini-batch arrives in the trainer layout of policy/base.py (prompt left-padded to the longest prompt,
response right-padded to the longest response). Here each row is re-laid out tight, prompt then response
then padding on the right, and rows are grouped, longest first, into micro-batches of at most
`max_tokens` padded tokens, each cut to its own longest row. Right padding means the causal mask alone
keeps real tokens from seeing padding, so every micro-batch uses the plain causal mask (the fast path of
flash/TE attention) and positions are 0..S-1 for every row, as in the rollout engine.

A batch of a mixture-of-experts policy with routing replay carries `routed_experts` ([B, P + R, layers, k],
aligned with `input_ids`): it is re-laid out exactly like the tokens, and positions without a routing
(padding) hold a fixed spread of experts (`filler_routing`), as in the batch (trainer/batching.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

# The model inputs of a trainer batch; every other per-row tensor travels with its rows into the loss.
INPUT_KEYS = ("input_ids", "attention_mask", "routed_experts")


@dataclass
class MicroBatch:
    rows: torch.Tensor  # [b] indices into the mini-batch
    tokens: torch.Tensor  # [b, S] prompt + response, right-padded
    labels: torch.Tensor  # [b, S] tokens shifted left by one (the token each position predicts)
    response_start: torch.Tensor  # [b] prompt length: position of the first response token
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the rows' loss inputs ([b, R] or [b])
    routed_experts: Optional[torch.Tensor] = None  # [b, S, layers, k] laid out like tokens (routing replay)

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


def row_lengths(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt lengths, response lengths) of each row."""
    R = batch["response_mask"].shape[1]
    P = batch["input_ids"].shape[1] - R
    return batch["attention_mask"][:, :P].sum(dim=1), batch["response_mask"].sum(dim=1).long()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, *, pad_multiple: int = 1) -> list[list[int]]:
    """Group rows, longest first, so that rows x (longest row, rounded up to `pad_multiple`) stays within
    `max_tokens`. A row longer than the budget travels alone. Deterministic (ties keep row order)."""
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    plans: list[list[int]] = []
    width = 0
    for i in order:
        if plans and (len(plans[-1]) + 1) * width <= max_tokens:
            plans[-1].append(i)
        else:
            width = _round_up(max(int(lengths[i]), 1), pad_multiple)
            plans.append([i])
    return plans


def filler_routing(rows: int, width: int, layers: int, k: int, num_experts: int,
                   dtype: torch.dtype = torch.int16) -> torch.Tensor:
    """[rows, width, layers, k]: the routing of positions without a recorded one (padding). Flattened
    position n takes experts (n * k + 0..k-1) mod num_experts: k distinct experts (a replayed top-k must
    not repeat one), and over the positions all experts in turn. Experts 0..k-1 everywhere would send every
    padding token to the first EP rank, which holds them: a load skew of its own under expert parallelism."""
    if num_experts < k:
        raise ValueError(f"a top-{k} routing over {num_experts} experts")
    n = torch.arange(rows * width).view(rows, width, 1, 1)
    experts = (n * k + torch.arange(k)) % num_experts
    return experts.expand(rows, width, layers, k).to(dtype).clone()


def _no_routing(rows: int, width: int, like: torch.Tensor, num_experts: Optional[int]) -> torch.Tensor:
    """filler_routing for routing `like` [B, T, layers, k] over `num_experts` experts (None: the experts
    `like` names, at least k: the micro-batch builders of a caller that does not know the model's count)."""
    L, k = like.shape[2:]
    if num_experts is None:
        num_experts = max(int(like.max()) + 1 if like.numel() else 0, k)
    return filler_routing(rows, width, L, k, num_experts, like.dtype)


def make_micro_batch(batch: Mapping[str, torch.Tensor], rows: Sequence[int], *, pad_token_id: int,
                     pad_multiple: int = 1, num_experts: Optional[int] = None) -> MicroBatch:
    """The rows of `batch` re-laid out tight (see module doc), with their loss inputs. `num_experts`: the
    model's, for the filler routing of padding (see _no_routing)."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    ids = batch["input_ids"][idx]
    R = batch["response_mask"].shape[1]
    P = ids.shape[1] - R
    plen, rlen = row_lengths({k: batch[k][idx] for k in ("input_ids", "attention_mask", "response_mask")})
    S = _round_up(max(int((plen + rlen).max()), 2), pad_multiple)
    tokens = torch.full((len(rows), S), pad_token_id, dtype=ids.dtype)
    for j in range(len(rows)):
        p, r = int(plen[j]), int(rlen[j])
        tokens[j, :p] = ids[j, P - p : P]
        tokens[j, p : p + r] = ids[j, P : P + r]
    routed = None
    if "routed_experts" in batch:
        src = batch["routed_experts"][idx]
        routed = _no_routing(len(rows), S, src, num_experts)
        for j in range(len(rows)):
            p, r = int(plen[j]), int(rlen[j])
            routed[j, :p] = src[j, P - p : P]
            routed[j, p : p + r] = src[j, P : P + r]
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = pad_token_id
    extras = {k: v[idx] for k, v in batch.items() if k not in INPUT_KEYS}
    return MicroBatch(rows=idx, tokens=tokens, labels=labels, response_start=plen, extras=extras,
                      routed_experts=routed)


def response_values(per_position: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    """[b, R] values of the response tokens from a [b, S] per-position tensor whose position t scores
    token t+1 (log-probabilities, entropies), 0 where response_mask is 0. Differentiable."""
    mask = mb.extras["response_mask"].to(per_position.device, per_position.dtype)
    R = mask.shape[1]
    S = per_position.shape[1]
    # response token j of row i sits at response_start_i + j and is predicted by the position before it
    index = (mb.response_start.unsqueeze(1) - 1 + torch.arange(R)).clamp(max=S - 1)
    return per_position.gather(1, index.to(per_position.device)) * mask


def split_micro_batches(batch: Mapping[str, torch.Tensor], max_tokens: int, *, pad_token_id: int,
                        pad_multiple: int = 1, num_experts: Optional[int] = None) -> list[MicroBatch]:
    plen, rlen = row_lengths(batch)
    plans = plan_micro_batches((plen + rlen).tolist(), max_tokens, pad_multiple=pad_multiple)
    return [make_micro_batch(batch, rows, pad_token_id=pad_token_id, pad_multiple=pad_multiple,
                             num_experts=num_experts) for rows in plans]


def empty_micro_batch(batch: Mapping[str, torch.Tensor], *, pad_token_id: int, pad_multiple: int = 1,
                      num_experts: Optional[int] = None) -> MicroBatch:
    """A micro-batch of no rows of `batch` (`rows` is empty): one padding row whose loss inputs are all
    zero (an empty response mask). A data-parallel rank whose share of a mini-batch is empty runs it, so
    that it still takes part in every collective of the step (pipeline sends, DP gradient reduction,
    TP all-reduces) while adding exactly nothing: its logprobs, entropies and loss are masked to 0, and
    a loss of 0 x (finite values) back-propagates zero gradients."""
    width = _round_up(2, pad_multiple)
    tokens = torch.full((1, width), pad_token_id, dtype=batch["input_ids"].dtype)
    extras = {k: v.new_zeros((1, *v.shape[1:])) for k, v in batch.items() if k not in INPUT_KEYS}
    routed = _no_routing(1, width, batch["routed_experts"], num_experts) if "routed_experts" in batch else None
    return MicroBatch(rows=torch.zeros(0, dtype=torch.long), tokens=tokens, labels=tokens.clone(),
                      response_start=torch.ones(1, dtype=torch.long), extras=extras, routed_experts=routed)


def pad_micro_batch(mb: MicroBatch, rows: int, width: int, *, num_experts: Optional[int] = None) -> MicroBatch:
    """`mb` grown to [rows, width] with padding rows whose loss inputs are zero (an empty response mask),
    for schedules that exchange fixed-shape tensors. `mb.rows` still names only the real rows, which
    come first."""
    b, S = mb.tokens.shape
    grow = (0, width - S, 0, rows - b)
    extras = {k: torch.nn.functional.pad(v, (0, 0) * (v.dim() - 1) + (0, rows - b)) for k, v in mb.extras.items()}
    routed = None
    if mb.routed_experts is not None:
        routed = _no_routing(rows, width, mb.routed_experts, num_experts)
        routed[:b, :S] = mb.routed_experts
    return MicroBatch(rows=mb.rows, tokens=torch.nn.functional.pad(mb.tokens, grow),
                      labels=torch.nn.functional.pad(mb.labels, grow),
                      response_start=torch.nn.functional.pad(mb.response_start, (0, rows - b), value=1), extras=extras,
                      routed_experts=routed)
