"""Golden values for the rollout-mismatch metrics and the importance-sampling corrections in the loss."""

import math

import pytest
import torch

from nemo_prorl.algo.loss import aggregate, clipped_surrogate, kl_penalty, masked_sum, policy_loss
from nemo_prorl.algo.offpolicy import mismatch_metrics, rollout_is_weights, sequence_geo_mask

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


# Sequence-level geometric-mean mask. Four responses of up to 3 tokens; LOG_R[b, t] = log(pi_old / pi_rollout).
#   0: ratios 1.5, 0.8        g = sqrt(1.2) ~ 1.095  inside [0.9, 1.2]: kept
#   1: ratios 2, 2            g = 2                  above: masked (its padding token is wild and must not count)
#   2: no tokens              g = 1                  kept (nothing was measured)
#   3: ratio 0.5              g = 0.5                below: masked
LOG_R = torch.tensor([[LN(1.5), LN(0.8), 7.0], [LN(2.0), LN(2.0), 50.0], [30.0, -30.0, 5.0], [LN(0.5), 9.0, 9.0]])
GEO_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
GEO_ADV = torch.tensor([1.0, 2.0, -1.0, 3.0])
GEO_BAND = dict(geo_mask_low=0.9, geo_mask_high=1.2)


def test_sequence_geo_mask_golden():
    old = torch.zeros(4, 3, requires_grad=True)
    keep, g = sequence_geo_mask(old, old.detach() - LOG_R, GEO_MASK, low=0.9, high=1.2)
    torch.testing.assert_close(g, torch.tensor([math.sqrt(1.2), 2.0, 1.0, 0.5]))
    assert keep.shape == (4, 1) and keep.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]
    assert not keep.requires_grad and not g.requires_grad
    # An empty response is kept even when the band excludes 1.
    keep, _ = sequence_geo_mask(old, old.detach() - LOG_R, GEO_MASK, low=1.5, high=3.0)
    assert keep.flatten().tolist() == [0.0, 1.0, 1.0, 0.0]
    # Log-ratios are clamped per token like the token-level weights.
    _, g = sequence_geo_mask(torch.zeros(1, 1), torch.tensor([[-50.0]]), torch.ones(1, 1), low=0.9, high=1.2)
    torch.testing.assert_close(g, torch.tensor([math.exp(20.0)]))


def _geo_loss(rows=slice(None), **kw):
    lp = torch.zeros(4, 3)[rows].requires_grad_()  # ratio 1 to old: the surrogate is -A, unclipped
    loss, m = policy_loss(lp, lp.detach(), GEO_ADV[rows], GEO_MASK[rows], clip_eps_low=0.2, clip_eps_high=0.4,
                          global_num_tokens=5.0, global_num_seqs=4.0, horizon=3, rollout_logprobs=-LOG_R[rows],
                          seq_geo_mask=True, **GEO_BAND, **kw)
    loss.backward()
    return loss, m, lp.grad


def test_seq_geo_mask_alone_golden():
    loss, m, grad = _geo_loss()
    # Only response 0 (A = 1, two tokens) trains, unweighted: loss = -(1 + 1) / 5
    assert loss.item() == pytest.approx(-0.4)
    torch.testing.assert_close(grad[0], torch.tensor([-0.2, -0.2, 0.0]))
    assert torch.equal(grad[1:], torch.zeros(3, 3))  # masked responses get exactly no gradient
    assert m["rollout_is/seq_masked_frac"].item() == pytest.approx(2 / 4)
    assert m["rollout_is/seq_geo_mean"].item() == pytest.approx((math.sqrt(1.2) + 2 + 1 + 0.5) / 4)
    assert "rollout_is/mean_weight" not in m  # mode none: no token-level weights


def test_seq_geo_mask_multiplies_tis_weights_golden():
    loss, m, grad = _geo_loss(rollout_correction="tis", tis_cap=1.4)
    # Token weights 1.4 (capped), 0.8 | 1.4, 1.4 | - | 0.5; the mask keeps response 0 only.
    assert loss.item() == pytest.approx(-(1.4 + 0.8) / 5)
    torch.testing.assert_close(grad[0], torch.tensor([-1.4, -0.8, 0.0]) / 5)
    assert torch.equal(grad[1:], torch.zeros(3, 3))
    # Token metrics describe the token weights over all tokens, masked responses included.
    assert m["rollout_is/mean_weight"].item() == pytest.approx((1.4 + 0.8 + 1.4 + 1.4 + 0.5) / 5)
    assert m["rollout_is/cut_frac"].item() == pytest.approx(3 / 5)
    assert m["rollout_is/seq_masked_frac"].item() == pytest.approx(2 / 4)


def test_seq_geo_mask_with_icepop_golden():
    loss, m, grad = _geo_loss(rollout_correction="icepop", icepop_low=0.6, icepop_high=1.4)
    # icepop drops response 0's first token (1.5 > 1.4); its geometric mean still counts that token, so the
    # response is kept and its second token trains with weight 0.8.
    assert loss.item() == pytest.approx(-0.8 / 5)
    torch.testing.assert_close(grad[0], torch.tensor([0.0, -0.8, 0.0]) / 5)
    assert torch.equal(grad[1:], torch.zeros(3, 3))
    assert m["rollout_is/cut_frac"].item() == pytest.approx(4 / 5)
    assert m["rollout_is/seq_masked_frac"].item() == pytest.approx(2 / 4)


@pytest.mark.parametrize("mode", ["none", "tis", "icepop"])
def test_seq_geo_metrics_sum_over_micro_batches(mode):
    whole_loss, whole, _ = _geo_loss(rollout_correction=mode)
    parts = [_geo_loss(rows, rollout_correction=mode) for rows in (slice(0, 1), slice(1, 3), slice(3, 4))]
    torch.testing.assert_close(sum(p[0] for p in parts), whole_loss)
    for key, value in whole.items():
        torch.testing.assert_close(sum(p[1][key] for p in parts), value, msg=key)


def test_seq_geo_mask_needs_rollout_logprobs():
    lp = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="seq_geo_mask=True needs rollout_logprobs"):
        policy_loss(lp, lp, torch.ones(1), torch.ones(1, 3), clip_eps_low=0.2, clip_eps_high=0.4,
                    global_num_tokens=3.0, global_num_seqs=1.0, horizon=3, seq_geo_mask=True)


def _policy_loss_before_seq_geo_mask(logprobs, old_logprobs, advantages, mask, *, clip_eps_low, clip_eps_high,
                                     global_num_tokens, global_num_seqs, horizon, loss_agg_mode="token-mean",
                                     clip_ratio_c=None, ref_logprobs=None, kl_coef=0.0, kl_estimator="k3",
                                     entropy=None, entropy_coef=0.0, rollout_logprobs=None,
                                     rollout_correction="none", tis_cap=2.0, icepop_low=0.5, icepop_high=2.0):
    """A frozen copy of policy_loss as it was before the sequence mask: the reference for bit-identity."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    mask = mask.to(logprobs.dtype)
    agg = dict(global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs, horizon=horizon)
    pg_mat, clipped, dual_clipped = clipped_surrogate(
        logprobs, old_logprobs, advantages,
        clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, clip_ratio_c=clip_ratio_c,
    )

    def token_mean(x):
        return masked_sum(x.detach(), mask) / global_num_tokens

    is_metrics = {}
    if rollout_correction != "none":
        weights, cut = rollout_is_weights(old_logprobs, rollout_logprobs, rollout_correction, tis_cap=tis_cap,
                                          icepop_low=icepop_low, icepop_high=icepop_high)
        pg_mat = pg_mat * weights
        is_metrics = {"rollout_is/mean_weight": token_mean(weights), "rollout_is/cut_frac": token_mean(cut)}
    pg_loss = aggregate(pg_mat, mask, loss_agg_mode, **agg)
    loss = pg_loss
    metrics = {
        "pg_loss": pg_loss.detach(),
        "clip_frac": token_mean(clipped),
        "dual_clip_frac": token_mean(dual_clipped),
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
        loss = loss - entropy_coef * aggregate(entropy, mask, loss_agg_mode, **agg)
    if entropy is not None:
        metrics["entropy"] = token_mean(entropy)
    metrics["loss"] = loss.detach()
    return loss, metrics


@pytest.mark.parametrize("mode", ["none", "tis", "icepop"])
@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_seq_geo_mask_off_is_bit_identical_to_before(mode, agg_mode):
    g = torch.Generator().manual_seed(1)
    lp0, old, ref, ro = (torch.randn(5, 7, generator=g) * 0.3 for _ in range(4))
    adv, mask = torch.randn(5, generator=g), (torch.rand(5, 7, generator=g) > 0.3).float()
    ent0 = torch.rand(5, 7, generator=g)
    args = dict(clip_eps_low=0.2, clip_eps_high=0.4, global_num_tokens=mask.sum(), global_num_seqs=5.0, horizon=7,
                loss_agg_mode=agg_mode, clip_ratio_c=3.0, kl_coef=0.01, entropy_coef=0.001,
                rollout_logprobs=ro, rollout_correction=mode, tis_cap=1.5, icepop_low=0.8, icepop_high=1.25)
    results = []
    for fn, extra in ((_policy_loss_before_seq_geo_mask, {}), (policy_loss, {}),
                      # the band is ignored while the mask is off, even one that would mask everything
                      (policy_loss, dict(seq_geo_mask=False, geo_mask_low=5.0, geo_mask_high=6.0))):
        lp, ent = lp0.clone().requires_grad_(), ent0.clone().requires_grad_()
        loss, m = fn(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, **args, **extra)
        loss.backward()
        results.append((loss, m, lp.grad, ent.grad))
    (ref_loss, ref_m, ref_g, ref_eg), *others = results
    for loss, m, grad, ent_grad in others:
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_g) and torch.equal(ent_grad, ref_eg)
        assert list(m) == list(ref_m)
        assert all(torch.equal(m[k], ref_m[k]) for k in ref_m)


def test_geo_mask_band_is_validated():
    from nemo_prorl.config import ConfigError, load_config

    load_config(["algo.rollout_correction.seq_geo_mask=true"])  # the defaults are valid
    for override in ("algo.rollout_correction.geo_mask_low=0", "algo.rollout_correction.geo_mask_low=1.001",
                     "algo.rollout_correction.geo_mask_high=0.99"):
        with pytest.raises(ConfigError, match="algo.rollout_correction.geo_mask_low=.*need 0 < geo_mask_low"):
            load_config([override])
