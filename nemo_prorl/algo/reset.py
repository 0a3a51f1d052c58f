"""ProRL's reference-policy reset (§2.3.1): the KL term keeps the policy near pi_ref, which stops progress
once the policy should have moved on; periodically pi_ref is hard-reset to the current policy (and,
optionally, the optimizer state is reset too). Reset on a schedule and/or when validation stalls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class ResetDecision:
    reset: bool
    reason: str = ""


def reference_reset_decision(
    *,
    step: int,
    last_reset_step: int,
    every_n_steps: Optional[int],
    val_history: Sequence[float],
    stall_patience: Optional[int],
    stall_min_delta: float = 0.0,
) -> ResetDecision:
    """Decide after `step` whether to reset the reference.

    every_n_steps: reset when `step - last_reset_step` reaches it (None: no schedule).
    val_history: validation metric values (higher is better) measured since the last reset, in order.
    stall_patience: reset when the last `stall_patience` evaluations all failed to beat the best earlier
        value by more than `stall_min_delta` (None: no stall rule).
    """
    if every_n_steps is not None and step - last_reset_step >= every_n_steps:
        return ResetDecision(True, f"schedule: {step - last_reset_step} steps since the last reset")
    if stall_patience is not None and len(val_history) > stall_patience:
        best_before = max(val_history[: -stall_patience])
        recent = val_history[-stall_patience:]
        if max(recent) <= best_before + stall_min_delta:
            return ResetDecision(
                True, f"stall: no validation gain over {best_before:.4f} in the last {stall_patience} evaluations"
            )
    return ResetDecision(False)
