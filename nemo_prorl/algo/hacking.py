"""The reward-hacking alarm's trend test. No verifier is perfect: a policy that learns to please the verifier
rather than to solve the task shows it as a training reward that keeps rising while held-out validation
falls. Per domain, given the training reward and the validation metric at each validation, the alarm is
raised when the training reward rose and validation fell, each by more than `min_delta`, from each
validation to the next at `patience` validations in a row. Changes within `min_delta` (sampling noise) and
any validation that breaks the pattern (a recovery, or a validation where the domain has no training or no
validation figure: a NaN in its row) end the streak. Rows are validations, the same ones for every domain:
the caller puts NaN where a domain's figure is missing rather than leaving the row out, so the domain's
validations on either side of a gap are never compared as if adjacent (tests/test_hacking_alarm.py pins it).

Pure: tensors in, tensors out; the trainer keeps the history and does the logging (trainer/validate.py)."""

from __future__ import annotations

import torch


def divergence_streak(train: torch.Tensor, val: torch.Tensor, min_delta: float) -> torch.Tensor:
    """`train`, `val`: [V, D], the training reward and the validation metric at V validations (oldest
    first) of D domains; NaN where a domain had no figure. Returns [D] int64: for how many validations in a
    row, ending at the last one, the training reward rose by more than `min_delta` and validation fell by
    more than `min_delta`, each from the validation before."""
    if train.shape != val.shape or train.dim() != 2:
        raise ValueError(f"train and val must both be [validations, domains], got {tuple(train.shape)} "
                         f"and {tuple(val.shape)}")
    rose = (train[1:] - train[:-1]) > min_delta  # a NaN on either side compares False: the streak ends
    fell = (val[:-1] - val[1:]) > min_delta
    diverged = (rose & fell).long()  # [V-1, D]
    # trailing run of 1s per column: the cumulative product from the newest backwards stays 1 along it
    return diverged.flip(0).cumprod(0).sum(0)


def hacking_flags(train: torch.Tensor, val: torch.Tensor, patience: int, min_delta: float) -> torch.Tensor:
    """[D] bool: the domains whose training reward rose while validation fell (each by more than
    `min_delta`) at the last `patience` validations in a row (see divergence_streak). patience 0: none."""
    streak = divergence_streak(train, val, min_delta)
    if patience <= 0:
        return torch.zeros_like(streak, dtype=torch.bool)
    return streak >= patience
