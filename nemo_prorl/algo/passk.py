"""pass@k with the unbiased estimator of Chen et al. 2021 (Codex, eq. 1), as the ProRL paper reports it."""

from __future__ import annotations

import math

import torch


def pass_at_k(num_samples: torch.Tensor, num_correct: torch.Tensor, k: int) -> torch.Tensor:
    """Per problem: 1 - C(n - c, k) / C(n, k), computed as a stable product. Needs k <= n for every problem."""
    n = num_samples.to(torch.float64)
    c = num_correct.to(torch.float64)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if bool((n < k).any()):
        raise ValueError(f"pass@{k} needs at least {k} samples per problem; got {int(n.min())}")
    # prod_{i=n-c+1}^{n} (1 - k / i): the probability that all k draws miss the c correct samples.
    i = torch.arange(1, int(n.max()) + 1, dtype=torch.float64)
    # Factors with i <= k only occur when n - c < k, where the answer is 1 anyway: give them log 1 = 0.
    log_f = torch.where(i > k, torch.log1p(-k / i), torch.zeros_like(i))
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(log_f, 0)])
    lo = (n - c).long()
    hi = n.long()
    miss = torch.exp(cum[hi] - cum[lo])
    miss = torch.where(n - c < k, torch.zeros_like(miss), miss)
    return 1.0 - miss


def pass_at_k_exact(n: int, c: int, k: int) -> float:
    """Reference formula with exact binomials, for tests and small numbers."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
