"""Golden values for the rollout-mismatch metrics and the importance-sampling corrections in the loss."""

import math

import pytest
import torch

from nemo_prorl.algo.loss import policy_loss
from nemo_prorl.algo.offpolicy import mismatch_metrics, rollout_is_weights

LN = math.log


def test_mismatch_metrics_golden():
    policy = torch.tensor([[0.0, -1.0, -2.0]])
    rollout = torch.tensor([[0.0, -1.5, -9.0]])  # the last token is padding: its difference must not count
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    m = mismatch_metrics(policy, rollout, mask, mask.sum())
    assert m["mean_abs_logprob_diff"].item() == pytest.approx(0.25)
    assert m["max_abs_logprob_diff"].item() == pytest.approx(0.5)
    assert m["mult_prob_error"].item() == pytest.approx((1 + math.exp(0.5)) / 2)


def test_tis_and_icepop_weights_golden():
    rollout = torch.zeros(1, 3)
    old = torch.tensor([[LN(0.4), LN(1.5), LN(3.0)]])
    w, cut = rollout_is_weights(old, rollout, "tis", tis_cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.4, 1.5, 2.0]]))
    assert cut.tolist() == [[0.0, 0.0, 1.0]]
    w, cut = rollout_is_weights(old, rollout, "icepop", icepop_low=0.5, icepop_high=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.5, 0.0]]))
    assert cut.tolist() == [[1.0, 0.0, 1.0]]
    w, cut = rollout_is_weights(old, rollout, "none")
    assert w.tolist() == [[1.0, 1.0, 1.0]] and cut.sum() == 0
    with pytest.raises(ValueError, match="allowed values: none, tis, icepop"):
        rollout_is_weights(old, rollout, "is")


def _loss(**kw):
    lp = torch.zeros(1, 3, requires_grad=True)  # ratio 1 to old: the surrogate is -A, unclipped
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    rollout = -torch.tensor([[LN(0.5), LN(1.5), LN(3.0)]])  # pi_old / pi_rollout = 0.5, 1.5, 3
    loss, m = policy_loss(lp, lp.detach(), adv, torch.ones(1, 3), clip_eps_low=0.2, clip_eps_high=0.4,
                          global_num_tokens=3.0, global_num_seqs=1.0, horizon=3, rollout_logprobs=rollout, **kw)
    loss.backward()
    return loss, m, lp.grad


def test_tis_reweights_the_policy_gradient_golden():
    loss, m, grad = _loss(rollout_correction="tis", tis_cap=2.0)
    # weights 0.5, 1.5, 2 (capped): loss = -(1*0.5 - 1*1.5 + 2*2) / 3
    assert loss.item() == pytest.approx(-1.0)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, 1.5, -4.0]]) / 3)
    assert m["rollout_is/mean_weight"].item() == pytest.approx(4.0 / 3)
    assert m["rollout_is/cut_frac"].item() == pytest.approx(1.0 / 3)


def test_icepop_masks_mismatched_tokens_golden():
    loss, m, grad = _loss(rollout_correction="icepop", icepop_low=0.6, icepop_high=2.0)
    # 0.5 and 3 fall outside [0.6, 2]: only the middle token (weight 1.5) trains
    assert loss.item() == pytest.approx(1.5 / 3)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.5, 0.0]]) / 3)
    assert m["rollout_is/cut_frac"].item() == pytest.approx(2.0 / 3)


def test_no_correction_leaves_the_loss_bit_identical():
    torch.manual_seed(0)
    lp, old, ro = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    adv, mask = torch.randn(4), (torch.rand(4, 6) > 0.3).float()
    args = dict(clip_eps_low=0.2, clip_eps_high=0.4, global_num_tokens=mask.sum(), global_num_seqs=4.0, horizon=6)
    base, mb = policy_loss(lp, old, adv, mask, **args)
    with_ro, mr = policy_loss(lp, old, adv, mask, rollout_logprobs=ro, rollout_correction="none", **args)
    assert torch.equal(base, with_ro) and mb.keys() == mr.keys()
    with pytest.raises(ValueError, match="needs rollout_logprobs"):
        policy_loss(lp, old, adv, mask, rollout_correction="tis", **args)
