"""The ProRL policy loss: PPO clipped surrogate with decoupled clip range (DAPO clip-higher), optional
dual-clip, KL penalty to the reference policy, entropy bonus, and explicit loss aggregation.

All per-token tensors are [batch, response_len] and come with `mask` (1 on response tokens). Every
normaliser is an argument: a micro-batch passes the token (or sequence) count of its whole mini-batch,
so the summed micro-batch losses equal the mini-batch loss however it is split.
"""

from __future__ import annotations

from typing import Optional

import torch

from nemo_prorl.algo.offpolicy import rollout_is_weights, sequence_geo_mask

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")

# exp() of a log-ratio beyond this overflows float32 long before it means anything (verl clamps at 20).
_MAX_LOG_RATIO = 20.0


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    global_num_tokens: torch.Tensor | float,
    global_num_seqs: torch.Tensor | float,
    horizon: int | float,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    token-mean              sum over all tokens / tokens in the global batch (DAPO §3.3, used by ProRL)
    seq-mean-token-sum      per-sequence token sum, averaged over sequences
    seq-mean-token-mean     per-sequence token mean, averaged over sequences (original GRPO)
    seq-mean-token-sum-norm per-sequence token sum / `horizon` (a constant, the max response length),
                            averaged over sequences (Dr. GRPO §3.1)
    """
    mask = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return masked_sum(loss_mat, mask) / global_num_tokens
    seq_sums = (loss_mat * mask).sum(dim=-1)
    if mode == "seq-mean-token-sum":
        return seq_sums.sum() / global_num_seqs
    if mode == "seq-mean-token-mean":
        return (seq_sums / mask.sum(dim=-1).clamp(min=1)).sum() / global_num_seqs
    if mode == "seq-mean-token-sum-norm":
        return seq_sums.sum() / (global_num_seqs * horizon)
    raise ValueError(f"unknown loss aggregation mode {mode!r}; allowed values: {', '.join(LOSS_AGG_MODES)}")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence").

    k1: log r          unbiased, high variance, can be negative
    k2: (log r)^2 / 2  biased, low variance
    k3: (r - 1) - log r with r = pi_ref / pi: unbiased and non-negative (GRPO's choice)
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        neg = (-log_ratio).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        # Clamped like verl's low_var_kl so one badly mismatched token cannot dominate the batch.
        return (torch.exp(neg) - neg - 1).clamp(min=-10.0, max=10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; allowed values: {', '.join(KL_ESTIMATORS)}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: logsumexp(z) - sum softmax(z) * z."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    clip_ratio_c: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a per-token loss, with the decoupled range [1 - eps_low, 1 + eps_high]
    (DAPO §3.1 "clip-higher"; ProRL §3.2 uses 0.2 / 0.4 to keep entropy from collapsing).

    Dual-clip (Ye et al. 2020): for negative advantages the loss is also bounded by -A * clip_ratio_c,
    so a token whose ratio exploded cannot produce an unbounded update.

    Returns (loss_mat, clipped, dual_clipped) where the last two are 0/1 float indicators.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = (clipped_loss > unclipped).to(logprobs.dtype)
    dual_clipped = torch.zeros_like(loss)
    if clip_ratio_c is not None:
        bound = -advantages * clip_ratio_c
        dual = torch.minimum(loss, bound)
        use_dual = advantages < 0
        dual_clipped = ((loss > bound) & use_dual).to(logprobs.dtype)
        loss = torch.where(use_dual, dual, loss)
    return loss, clipped, dual_clipped


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    global_num_tokens: torch.Tensor | float,
    global_num_seqs: torch.Tensor | float,
    horizon: int | float,
    loss_agg_mode: str = "token-mean",
    clip_ratio_c: Optional[float] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    rollout_logprobs: Optional[torch.Tensor] = None,
    rollout_correction: str = "none",
    tis_cap: float = 2.0,
    icepop_low: float = 0.5,
    icepop_high: float = 2.0,
    seq_geo_mask: bool = False,
    geo_mask_low: float = 0.999,
    geo_mask_high: float = 1.002,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full ProRL loss for one micro-batch.

    With `rollout_correction` tis or icepop, the per-token policy-gradient term is weighted by the
    importance ratio of the trainer's sampling-time policy (`old_logprobs`) to the rollout engine's
    logprobs (`rollout_logprobs`), see nemo_prorl.algo.offpolicy. With `seq_geo_mask`, responses whose
    geometric-mean ratio lies outside [geo_mask_low, geo_mask_high] are also dropped from the
    policy-gradient term (on top of the token weights; the KL and entropy terms are unaffected), and the
    "rollout_is/seq_*" metrics are sequence sums divided by `global_num_seqs`.

    `advantages` is per token ([B, R]) or per sequence ([B], broadcast over tokens). Metrics are token
    sums divided by `global_num_tokens`, so summing them over the micro-batches of a mini-batch gives the
    mini-batch mean, exactly like the loss.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    mask = mask.to(logprobs.dtype)
    agg = dict(global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs, horizon=horizon)

    pg_mat, clipped, dual_clipped = clipped_surrogate(
        logprobs, old_logprobs, advantages,
        clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, clip_ratio_c=clip_ratio_c,
    )
    def token_mean(x: torch.Tensor) -> torch.Tensor:
        return masked_sum(x.detach(), mask) / global_num_tokens

    is_metrics = {}
    if rollout_correction != "none":
        if rollout_logprobs is None:
            raise ValueError(f"rollout_correction={rollout_correction!r} needs rollout_logprobs")
        weights, cut = rollout_is_weights(old_logprobs, rollout_logprobs, rollout_correction, tis_cap=tis_cap,
                                          icepop_low=icepop_low, icepop_high=icepop_high)
        pg_mat = pg_mat * weights
        is_metrics = {"rollout_is/mean_weight": token_mean(weights), "rollout_is/cut_frac": token_mean(cut)}
    if seq_geo_mask:
        # Only inside this branch: with the mask off the loss and metrics stay bit-identical to before.
        if rollout_logprobs is None:
            raise ValueError("seq_geo_mask=True needs rollout_logprobs")
        keep, geo_mean = sequence_geo_mask(old_logprobs, rollout_logprobs, mask, low=geo_mask_low,
                                           high=geo_mask_high)
        pg_mat = pg_mat * keep
        # Per-response sums over global_num_seqs: the micro-batch values add up to the mini-batch mean,
        # the same contract as token_mean.
        is_metrics = {**is_metrics,
                      "rollout_is/seq_masked_frac": (1.0 - keep).sum() / global_num_seqs,
                      "rollout_is/seq_geo_mean": geo_mean.sum() / global_num_seqs}
    pg_loss = aggregate(pg_mat, mask, loss_agg_mode, **agg)
    loss = pg_loss

    metrics = {
        "pg_loss": pg_loss.detach(),
        "clip_frac": token_mean(clipped),
        "dual_clip_frac": token_mean(dual_clipped),
        # Mean of k3 between the policy being trained and the one that sampled: how far the mini-batch
        # updates moved off-policy.
        "ppo_kl": token_mean(kl_penalty(logprobs, old_logprobs, "k3")),
        **is_metrics,
    }
    if ref_logprobs is not None:
        kl_mat = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        kl_loss = aggregate(kl_mat, mask, loss_agg_mode, **agg)
        metrics["kl"] = token_mean(kl_mat)
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl_loss
    if entropy_coef != 0.0:
        # A detached entropy would make the bonus a constant: the loss would change, the update would not.
        if entropy is None or (logprobs.requires_grad and not entropy.requires_grad):
            raise ValueError(f"entropy_coef={entropy_coef:g} needs the per-token entropy with its gradient")
        loss = loss - entropy_coef * aggregate(entropy, mask, loss_agg_mode, **agg)
    if entropy is not None:
        metrics["entropy"] = token_mean(entropy)
    metrics["loss"] = loss.detach()
    return loss, metrics
