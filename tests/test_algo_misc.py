import math

import pytest
import torch

from nemo_prorl.algo.passk import pass_at_k, pass_at_k_exact
from nemo_prorl.algo.reset import reference_reset_decision
from nemo_prorl.algo.sampling import groups_with_signal, take_groups
from nemo_prorl.algo.shaping import overlong_penalty, stop_properly_penalty


def test_groups_with_signal():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.52, 0.5]])
    assert groups_with_signal(r).tolist() == [False, True, False, True]
    assert groups_with_signal(r, atol=0.05).tolist() == [False, True, False, False]


def test_take_groups_fills_only_what_is_missing():
    keep = torch.tensor([True, False, True, True, True])
    assert take_groups(0, keep, 10).tolist() == [0, 2, 3, 4]
    assert take_groups(8, keep, 10).tolist() == [0, 2]
    assert take_groups(10, keep, 10).tolist() == []


def test_overlong_penalty_golden():
    # DAPO eq. 13 with L_max = 10, L_cache = 4: zero up to 6, linear to -1 at 10, -1 beyond.
    lengths = torch.tensor([5, 6, 7, 8, 10, 12])
    pen = overlong_penalty(lengths, max_response_length=10, buffer_length=4, penalty_factor=1.0)
    assert pen.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    pen2 = overlong_penalty(lengths, max_response_length=10, buffer_length=4, penalty_factor=0.5)
    assert pen2.tolist() == [0.0, 0.0, -0.125, -0.25, -0.5, -0.5]


def test_stop_properly_penalty():
    r = torch.tensor([1.0, 1.0, 0.5])
    out = stop_properly_penalty(r, torch.tensor([False, True, True]), truncated_reward_scale=0.0)
    assert out.tolist() == [1.0, 0.0, 0.0]


def test_reset_on_schedule():
    d = reference_reset_decision(step=10, last_reset_step=0, every_n_steps=10, val_history=[],
                                 stall_patience=None)
    assert d.reset and "schedule" in d.reason
    assert not reference_reset_decision(step=9, last_reset_step=0, every_n_steps=10, val_history=[],
                                        stall_patience=None).reset
    assert not reference_reset_decision(step=15, last_reset_step=10, every_n_steps=10, val_history=[],
                                        stall_patience=None).reset


@pytest.mark.parametrize("history,patience,delta,expected", [
    ([0.1, 0.2, 0.3], 2, 0.0, False),  # still improving
    ([0.1, 0.3, 0.3, 0.29], 2, 0.0, True),  # best 0.3 not beaten in the last two
    ([0.1, 0.3, 0.305, 0.29], 2, 0.01, True),  # a gain below min_delta does not count
    ([0.1, 0.3, 0.32, 0.29], 2, 0.01, False),
    ([0.3, 0.2], 2, 0.0, False),  # not enough evaluations yet
])
def test_reset_on_validation_stall(history, patience, delta, expected):
    d = reference_reset_decision(step=5, last_reset_step=0, every_n_steps=None, val_history=history,
                                 stall_patience=patience, stall_min_delta=delta)
    assert d.reset is expected
    if expected:
        assert "stall" in d.reason


def test_pass_at_k_golden():
    n, c = torch.tensor([8, 8, 10, 5]), torch.tensor([2, 0, 3, 5])
    torch.testing.assert_close(pass_at_k(n, c, 1), torch.tensor([0.25, 0.0, 0.3, 1.0], dtype=torch.float64))
    # 1 - C(7,2)/C(10,2) = 1 - 21/45
    assert pass_at_k(torch.tensor([10]), torch.tensor([3]), 2).item() == pytest.approx(1 - 21 / 45)
    assert pass_at_k(torch.tensor([8]), torch.tensor([1]), 8).item() == 1.0


def test_pass_at_k_matches_exact_binomials():
    for n in (1, 4, 16, 64):
        for c in range(n + 1):
            for k in (1, 2, 4, 8, 16):
                if k <= n:
                    got = pass_at_k(torch.tensor([n]), torch.tensor([c]), k).item()
                    assert math.isclose(got, pass_at_k_exact(n, c, k), abs_tol=1e-12), (n, c, k)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="needs at least 16 samples"):
        pass_at_k(torch.tensor([8]), torch.tensor([1]), 16)
