import math

import pytest
import torch

from nemo_prorl.algo.loss import aggregate, clipped_surrogate, entropy_from_logits, kl_penalty, policy_loss

LN = math.log


def test_clipped_surrogate_decoupled_golden():
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1]])
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0]])
    loss, clipped, dual = clipped_surrogate(ratios.log(), torch.zeros_like(ratios), adv,
                                            clip_eps_low=0.2, clip_eps_high=0.4)
    # A>0 ratio 1.5: capped at 1 + eps_high; A<0 ratio 0.5: capped at 1 - eps_low; others unclipped.
    torch.testing.assert_close(loss, torch.tensor([[-1.4, 1.5, 0.8, -0.5, -1.1]]), atol=1e-6, rtol=0)
    assert clipped.tolist() == [[1.0, 0.0, 1.0, 0.0, 0.0]]
    assert dual.sum() == 0


def test_clip_higher_admits_more_than_symmetric():
    lp, old, adv = torch.tensor([LN(1.3)]), torch.tensor([0.0]), torch.tensor([1.0])
    sym, c_sym, _ = clipped_surrogate(lp, old, adv, clip_eps_low=0.2, clip_eps_high=0.2)
    hi, c_hi, _ = clipped_surrogate(lp, old, adv, clip_eps_low=0.2, clip_eps_high=0.4)
    torch.testing.assert_close(sym, torch.tensor([-1.2]))
    torch.testing.assert_close(hi, torch.tensor([-1.3]))
    assert c_sym.item() == 1.0 and c_hi.item() == 0.0


def test_dual_clip_bounds_negative_advantage():
    lp, old, adv = torch.tensor([LN(5.0), LN(5.0)]), torch.zeros(2), torch.tensor([-1.0, 2.0])
    loss, _, dual = clipped_surrogate(lp, old, adv, clip_eps_low=0.2, clip_eps_high=0.4, clip_ratio_c=3.0)
    torch.testing.assert_close(loss, torch.tensor([3.0, -2.8]), atol=1e-5, rtol=0)
    assert dual.tolist() == [1.0, 0.0]


LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", 10 / 4),
    ("seq-mean-token-sum", 10 / 2),
    ("seq-mean-token-mean", (6 / 3 + 4 / 1) / 2),
    ("seq-mean-token-sum-norm", 10 / (2 * 4)),
])
def test_aggregate_golden(mode, expected):
    out = aggregate(LOSS_MAT, MASK, mode, global_num_tokens=4, global_num_seqs=2, horizon=4)
    assert out.item() == pytest.approx(expected, abs=1e-6)


def test_aggregate_normaliser_is_an_argument():
    # Half of a larger mini-batch: the same tokens contribute half as much.
    out = aggregate(LOSS_MAT, MASK, "token-mean", global_num_tokens=8, global_num_seqs=4, horizon=4)
    assert out.item() == pytest.approx(10 / 8)
    with pytest.raises(ValueError, match="allowed values"):
        aggregate(LOSS_MAT, MASK, "sum", global_num_tokens=1, global_num_seqs=1, horizon=1)


def test_kl_estimators_golden():
    lp, ref = torch.tensor([LN(0.5)]), torch.tensor([LN(0.25)])
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(LN(2), abs=1e-6)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * LN(2) ** 2, abs=1e-6)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 + LN(2) - 1, abs=1e-6)
    assert kl_penalty(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(lp, ref, "k4")


def test_k3_is_non_negative():
    g = torch.Generator().manual_seed(0)
    lp, ref = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert (kl_penalty(lp, ref, "k3") >= 0).all()


def test_entropy_golden():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [LN(0.5), LN(0.25), LN(0.25), -1e9]])
    ent = entropy_from_logits(logits)
    torch.testing.assert_close(ent, torch.tensor([LN(4), 1.5 * LN(2)]), atol=1e-6, rtol=0)


def _inputs(seed=0, B=6, R=5):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(B, R, generator=g) * 3).requires_grad_()
    old = lp.detach() + 0.3 * torch.randn(B, R, generator=g)
    ref = lp.detach() + 0.2 * torch.randn(B, R, generator=g)
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, R, generator=g) > 0.3).float()
    mask[:, 0] = 1
    ent = torch.rand(B, R, generator=g).requires_grad_()  # the bonus needs the entropy's gradient
    return lp, old, ref, adv, mask, ent


KW = dict(clip_eps_low=0.2, clip_eps_high=0.4, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_does_not_depend_on_micro_batching(mode):
    lp, old, ref, adv, mask, ent = _inputs()
    norms = dict(global_num_tokens=mask.sum(), global_num_seqs=6.0, horizon=5, loss_agg_mode=mode)
    full, m_full = policy_loss(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, **norms, **KW)
    (g_full,) = torch.autograd.grad(full, lp)
    parts, metric_sums = [], {}
    for rows in (slice(0, 2), slice(2, 6)):
        loss, m = policy_loss(lp[rows], old[rows], adv[rows], mask[rows], ref_logprobs=ref[rows],
                              entropy=ent[rows], **norms, **KW)
        parts.append(loss)
        for k, v in m.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v
    (g_split,) = torch.autograd.grad(sum(parts), lp)
    torch.testing.assert_close(sum(parts), full, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_split, g_full, atol=1e-7, rtol=0)
    for k in m_full:
        torch.testing.assert_close(metric_sums[k], m_full[k], atol=1e-6, rtol=0)


def test_policy_loss_golden_small():
    # One token per sequence, on-policy (ratio 1): pg = -mean(A); k3 with ref = log 0.5 vs lp = log 0.25.
    lp = torch.tensor([[LN(0.25)], [LN(0.25)]])
    loss, m = policy_loss(lp, lp, torch.tensor([1.0, -3.0]), torch.ones(2, 1), clip_eps_low=0.2,
                          clip_eps_high=0.4, global_num_tokens=2, global_num_seqs=2, horizon=1,
                          ref_logprobs=torch.full((2, 1), LN(0.5)), kl_coef=0.5, entropy=torch.ones(2, 1),
                          entropy_coef=0.1)
    kl = 2.0 - LN(2.0) - 1.0  # k3 = r - log r - 1 with r = 2
    assert m["pg_loss"].item() == pytest.approx(1.0)
    assert m["kl"].item() == pytest.approx(kl, abs=1e-6)
    assert loss.item() == pytest.approx(1.0 + 0.5 * kl - 0.1 * 1.0, abs=1e-6)
    assert m["clip_frac"].item() == 0.0


def test_policy_loss_fixed_seed_is_bit_identical():
    """Pins the exact float result: a refactor of the loss must not change a single bit."""
    lp, old, ref, adv, mask, ent = _inputs(seed=1234, B=16, R=12)
    loss, m = policy_loss(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, global_num_tokens=mask.sum(),
                          global_num_seqs=16.0, horizon=12, clip_ratio_c=3.0, **KW)
    assert loss.item().hex() == GOLDEN_LOSS_HEX, loss.item().hex()
    assert m["clip_frac"].item().hex() == GOLDEN_CLIPFRAC_HEX, m["clip_frac"].item().hex()


GOLDEN_LOSS_HEX = "0x1.0c43f00000000p-2"
GOLDEN_CLIPFRAC_HEX = "0x1.1dc4780000000p-3"
