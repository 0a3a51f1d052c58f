"""Math verifier: answer extraction, equivalences accepted by Math-Verify or the sympy fallback, hard time outs."""

from pathlib import Path

import pytest

from nemo_prorl.config.schema import MathRewardConfig, RewardConfig
from nemo_prorl.rewards import RewardInput
from nemo_prorl.rewards.extract import last_boxed, strip_thinking
from nemo_prorl.rewards.math_verifier import MathReward, answers_equal, normalize, rounds_to, to_number


@pytest.fixture(scope="module")
def reward():
    r = MathReward(RewardConfig(math=MathRewardConfig(timeout_s=3.0, num_workers=2)))
    yield r
    r.close()


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed {7}", "7"),  # spacing
    (r"\fbox{3}", "3"),
    (r"first \boxed{1} then \boxed{2}", "2"),  # the last one
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not nest
    (r"\boxed{\left(1,\frac{2}{3}\right)}", r"\left(1,\frac{2}{3}\right)"),
    (r"$\boxed 5$", "5"),
    (r"\boxed{unclosed", None),
    ("no box at all", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_only_text_after_thinking_counts():
    assert strip_thinking(r"<think>\boxed{1}</think> answer \boxed{2}") == r" answer \boxed{2}"
    assert strip_thinking("no think tags") == "no think tags"


EQUAL = [
    (r"\frac12", "0.5"), (r"\dfrac{1}{2}", r"\frac{1}{2}"), ("50\\%", "0.5"), ("50\\%", "50"), ("[0,1)", "[0, 1)"),
    (r"\{1,2\}", r"\{2,1\}"), ("1, 2", "2, 1"), (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{bmatrix}1&2\\3&4\end{bmatrix}"),
    (r"5\text{ cm}", "5"), (r"10^\circ", "10"), ("x=3", "3"), ("1,000", "1000"), (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"),
    (r"\frac{-3}{4}", "-0.75"), (r"2\pi", r"\pi + \pi"), ("(1, 2)", r"\left(1,2\right)"), ("3.", "3"),
    (r"x^2+2x+1", r"(x+1)^2"), (r"\text{(B)}", "B"),
    # issue 29: the same integer however written, and a rounded value that has no finite decimal form
    ("1,000,000,007", "1000000007"), ("1.000000007e9", "1000000007"), ("0.3333333", r"\frac{1}{3}"),
]
NOT_EQUAL = [
    ("2", "3"), ("(0,1)", "[0,1)"), (r"\{1,2\}", r"\{1,3\}"), ("1, 2", "1, 2, 3"), (r"\frac{\pi}{3}", "60"),
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\4&3\end{pmatrix}"), ("0.5001", "0.5"),
    (r"x^2", "2x"), ("-1", "1"),
    # issue 29: integers and finite decimals compare exactly (a relative 1e-6 took each of these)
    ("1000000000", "1000000007"), ("1.0e9", "1000000007"), ("1,000,000,000", "1000000007"),
    # issue 29 review: a fraction is no integer's near miss, nor another fraction's; a decimal is 1/3 only rounded
    (r"\frac{3000000001}{3}", "1000000007"), (r"\frac{1}{3}", r"\frac{333334}{1000003}"), ("0.334", r"\frac{1}{3}"),
]


@pytest.mark.parametrize("pred,truth", EQUAL)
def test_equivalent_answers_score_one(reward, pred, truth):
    res = reward.score(RewardInput(response=rf"<think>\boxed{{wrong}}</think> Thus \boxed{{{pred}}}", ground_truth=truth))
    assert (res.reward, res.correct, res.status) == (1.0, True, "ok"), res


@pytest.mark.parametrize("pred,truth", NOT_EQUAL)
def test_different_answers_score_zero(reward, pred, truth):
    res = reward.score(RewardInput(response=rf"\boxed{{{pred}}}", ground_truth=truth))
    assert (res.reward, res.correct, res.status) == (0.0, False, "ok"), res


@pytest.mark.parametrize("pred,truth", [
    ("50\\%", "0.5"), ("[0,1)", "[0, 1)"), (r"\frac{-3}{4}", "-0.75"), (r"x^2+2x+1", r"(x+1)^2"),
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{bmatrix}1&2\\3&4\end{bmatrix}"), ("1,000", "1000"),
])
def test_fallback_alone_accepts(pred, truth):
    """The sympy fallback is a verifier on its own (ProRL accepts if either says yes)."""
    assert answers_equal(pred, truth)


@pytest.mark.parametrize("pred,truth", NOT_EQUAL)
def test_fallback_alone_rejects(pred, truth):
    assert not answers_equal(pred, truth)


@pytest.mark.parametrize("s,v", [("3", 3.0), ("-0.25", -0.25), (r"\frac{3}{4}", 0.75), (r"-\frac{1}{2}", -0.5),
                                 ("25%", 0.25), ("1/3", 1 / 3), ("1e-3", 1e-3), ("abc", None), ("1/0", None)])
def test_to_number(s, v):
    assert to_number(s) == (pytest.approx(v) if v is not None else None)


def test_normalize_strips_formatting_noise():
    assert normalize(r"\left( \dfrac{1}{2}, 3 \right)") == r"(\frac{1}{2},3)"
    assert normalize(r"$12$ \text{ inches}.") == "12"


def test_missing_box_is_a_wrong_answer_and_empty_truth_an_error(reward):
    res = reward.score(RewardInput(response="the answer is 4", ground_truth="4"))
    assert res.status == "ok" and res.reward == 0 and "boxed" in res.reason
    assert reward.score(RewardInput(response=r"\boxed{4}", ground_truth=" ")).status == "error"


def test_pathological_expression_times_out_and_the_pool_keeps_serving(reward):
    res = reward.score(RewardInput(response=r"\boxed{2^{2^{2^{2^{100}}}}}", ground_truth="3"))
    assert res.status == "timeout" and res.reward == 0 and "no result within 3 s; worker killed" in res.reason
    # right after the kill: the replacement worker's start (spawn, sympy and math-verify imports) is not
    # charged to these calls' time limit, so a correct answer scores 1 even on a busy machine
    batch = reward.score_batch([RewardInput(response=r"\boxed{4}", ground_truth="4"),
                                RewardInput(response=r"\boxed{5}", ground_truth="4")])
    assert [r.reward for r in batch] == [1.0, 0.0]


def _square(x):
    return x * x


def _crash(x):
    import os

    os._exit(3)


def test_worker_pool_reports_errors_and_replaces_dead_workers():
    from nemo_prorl.confine.workers import HardTimeoutPool

    pool = HardTimeoutPool(1, ro_paths=[str(Path(__file__).parent)])  # a confined worker imports this module
    try:
        assert [o.value for o in pool.map(_square, [1, 2, 3], timeout=30)] == [1, 4, 9]
        died = pool.call(_crash, 0, timeout=30)  # the call's process dies (each call is a forked child)
        assert died.status == "error" and "died (exit code 3)" in died.reason
        unpicklable = pool.call(_square, lambda: 0, timeout=30)
        assert unpicklable.status == "error" and "could not send" in unpicklable.reason
        raised = pool.call(_square, "x", timeout=30)
        assert raised.status == "error" and "TypeError" in raised.reason
        assert pool.call(_square, 5, timeout=30).value == 25  # still serving
    finally:
        pool.close()


def _sleep_then_confine():
    import time

    time.sleep(3.0)  # a slow start: longer than the calls' time limit below


def _exit_first_time(arg):
    import os

    marker, _ = arg
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(7)  # the worker dies before it begins the call


def test_worker_start_up_does_not_count_against_the_time_limit():
    from nemo_prorl.confine.workers import HardTimeoutPool

    pool = HardTimeoutPool(1, initializer=_sleep_then_confine, preload=("sympy",))
    try:
        assert pool.call(_square, 6, timeout=2.0).value == 36  # started 3 s after the call was sent
        pool.call(_crash, 0, timeout=30)  # the replacement starts slowly again
        assert pool.call(_square, 7, timeout=2.0).value == 49
    finally:
        pool.close()


def test_a_worker_that_dies_before_the_call_begins_is_replaced_and_the_call_retried(tmp_path):
    from nemo_prorl.confine.workers import HardTimeoutPool

    pool = HardTimeoutPool(1, initializer=None)  # not confined: `prepare` writes its marker in tmp_path
    try:
        out = pool.call(_first, (str(tmp_path / "died-once"), 5), timeout=30, prepare=_exit_first_time)
        assert (out.status, out.value) == ("ok", 5) and (tmp_path / "died-once").exists()
    finally:
        pool.close()


def _first(arg):
    return arg[1]


@pytest.mark.parametrize("x,dec,k,expected", [
    ((1, 3), "0.333", 3, True), ((2, 3), "0.667", 3, True), ((2, 3), "0.666", 3, True), ((2, 3), "0.668", 3, False),
    ((-2, 3), "-0.667", 3, True), ((-2, 3), "-0.666", 3, True), ((-2, 3), "-0.665", 3, False),
    ((1, 3), "0.3333", 3, False),  # k is what the decimal writes: not a multiple of 10^-3
])
def test_rounds_to_accepts_rounding_and_truncation_only(x, dec, k, expected):
    from fractions import Fraction

    assert rounds_to(Fraction(*x), Fraction(dec), k) is expected
