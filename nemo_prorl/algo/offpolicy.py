"""Training-inference mismatch: the rollout engine (vLLM, other kernels, other precision) samples from a
distribution slightly different from the policy the trainer computes. These functions measure that gap
and provide the token-level importance-sampling corrections for it, plus a sequence-level mask.

Per-token tensors are [batch, response_len] with `mask` (1 on response tokens)."""

from __future__ import annotations

import torch

ROLLOUT_CORRECTIONS = ("none", "tis", "icepop")

# A log-ratio beyond this is numerically meaningless in float32 exp() (the same bound as the PPO ratio).
_MAX_LOG_RATIO = 20.0


def mismatch_metrics(policy_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                     num_tokens: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """How far the engine's sampling logprobs are from the policy's on the same tokens.

    mean_abs_logprob_diff  mean |log p_policy - log p_rollout| over response tokens
    max_abs_logprob_diff   the worst token
    mult_prob_error        mean exp(|log p_policy - log p_rollout|): the multiplicative error of a token's
                           probability (1.0 when they agree; NeMo-RL's token_mult_prob_error)
    k3_kl                  mean k3 estimate of KL(pi_rollout || pi_policy) from the engine's samples:
                           r - 1 - log r with r = p_policy / p_rollout (unbiased, >= 0 per token)
    """
    mask = mask.to(policy_logprobs.dtype)
    log_r = (policy_logprobs - rollout_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    diff = log_r.abs() * mask
    return {
        "mean_abs_logprob_diff": diff.sum() / num_tokens,
        "max_abs_logprob_diff": diff.max() if diff.numel() else diff.sum(),
        "mult_prob_error": (torch.exp(diff) * mask).sum() / num_tokens,
        "k3_kl": ((torch.exp(log_r) - 1 - log_r) * mask).sum() / num_tokens,
    }


def rollout_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mode: str, *,
                       tis_cap: float = 2.0, icepop_low: float = 0.5,
                       icepop_high: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights w for the policy-gradient term, from r = pi_old / pi_rollout on each token
    (no gradient flows through them), and a 0/1 indicator of the tokens whose r was cut.

    tis     w = min(r, tis_cap): truncated importance sampling (Yao et al. 2025), unbiased up to the cap
    icepop  w = r where low <= r <= high, else 0: tokens with a large mismatch are dropped from the
            gradient instead of reweighted (IcePop, Ling team 2025)
    none    w = 1
    """
    log_r = (old_logprobs - rollout_logprobs).detach().clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    r = torch.exp(log_r)
    if mode == "none":
        return torch.ones_like(r), torch.zeros_like(r)
    if mode == "tis":
        cut = r > tis_cap
        return r.clamp(max=tis_cap), cut.to(r.dtype)
    if mode == "icepop":
        cut = (r < icepop_low) | (r > icepop_high)
        return torch.where(cut, torch.zeros_like(r), r), cut.to(r.dtype)
    raise ValueError(f"unknown rollout correction {mode!r}; allowed values: {', '.join(ROLLOUT_CORRECTIONS)}")


def sequence_geo_mask(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, *,
                      low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence-level geometric-mean mask ("seq-mask-tis" in NeMo-RL's ProRL v2.1 guide).

    Per response, g = exp(mean over its tokens of log(pi_old / pi_rollout)), the geometric mean of the
    token ratios. Token-level corrections judge each token alone; a response whose tokens are each only
    slightly off, but all in the same direction, was sampled by a policy that differs from the proximal
    one as a whole (stale in async GRPO, or a systematic kernel mismatch), and its gradient is biased even
    when no single token is. The mask drops such a response entirely: keep = low <= g <= high.

    Returns (keep [B, 1] 0/1 float, broadcast over tokens; g [B]), both without gradient. A response with
    no tokens has g = 1 and is always kept: it contributes nothing to the gradient anyway, and counting it
    as masked would report a mismatch that was never measured.
    """
    mask = mask.to(old_logprobs.dtype)
    # Clamped per token like rollout_is_weights, so one wild token cannot overflow the sum.
    log_r = (old_logprobs - rollout_logprobs).detach().clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    num_tokens = mask.sum(dim=-1)
    geo_mean = torch.exp((log_r * mask).sum(dim=-1) / num_tokens.clamp(min=1))
    keep = ((geo_mean >= low) & (geo_mean <= high)) | (num_tokens == 0)
    return keep.to(old_logprobs.dtype).unsqueeze(-1), geo_mean
