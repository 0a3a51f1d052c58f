"""STEM verifier: multiple-choice letters, numbers with tolerance and scientific notation, expressions."""

import pytest

from nemo_prorl.config.schema import RewardConfig
from nemo_prorl.rewards import RewardInput
from nemo_prorl.rewards.stem import StemReward, extract_choice, parse_number


@pytest.fixture(scope="module")
def reward():
    r = StemReward(RewardConfig(stem_rel_tol=0.01))
    yield r
    r.close()


@pytest.mark.parametrize("text,letter", [
    (r"so \boxed{C}", "C"),
    (r"\boxed{\text{C}}", "C"),
    (r"\boxed{(C)}", "C"),
    ("Answer: (C)", "C"),
    ("The answer is C", "C"),
    ("The correct answer is **C**", "C"),
    ("Final Answer: C.", "C"),
    ("answer: c", "C"),
    ("Answer: C) 42 J", "C"),
    ("Answer: C. because the field is uniform", "C"),
    ("<answer>D</answer>", "D"),
    ("B", "B"),
    ("(B).", "B"),
    ("I first thought the answer is A, but on reflection the answer is D.", "D"),  # the last statement
    (r"\boxed{B} ... wait, Answer: (J)", "J"),
    ("A good way to start is to compute the energy.", None),  # prose capitals do not count
    ("Answer: Because of symmetry the flux vanishes.", None),
    ("the answer is a matter of taste", None),
    ("The answer is K", None),  # outside A-J
])
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


@pytest.mark.parametrize("s,v", [
    ("4.5", 4.5), ("-2", -2.0), ("3.2e-5", 3.2e-5), (r"3.2 \times 10^{-5}", 3.2e-5), ("3.2×10^-5", 3.2e-5),
    ("3.2*10**-5", 3.2e-5), ("4.5 m/s", 4.5), (r"4.5\text{ J}", 4.5), ("1,200", 1200.0), (r"\frac{3}{4}", 0.75),
    ("6.02E23", 6.02e23), ("x + 1", None), ("3 + 4", None), ("", None),
    (r"-\frac{3}{2}", -1.5), ("- 4.5", -4.5), (r"10^{-5}", 1e-5), (r"$-\frac{1}{2}$", -0.5), ("−2.5", -2.5),
])
def test_parse_number(s, v):
    got = parse_number(s)
    assert (got is None) if v is None else got == pytest.approx(v, rel=1e-12)


@pytest.mark.parametrize("response,truth,ok", [
    ("Answer: (C)", "C", True),
    ("Answer: (C)", "(C)", True),
    ("Answer: (B)", "C", False),
    ("<think>the answer is C</think>The answer is B", "B", True),  # thinking text is ignored
    ("<think>the answer is C</think>The answer is B", "C", False),
    (r"\boxed{3.2 \times 10^{-5}}", "3.2e-5", True),
    (r"\boxed{3.23e-5}", "3.2e-5", True),  # 0.9 % off: within 1 %
    (r"\boxed{3.24e-5}", "3.2e-5", False),  # 1.25 % off
    ("so the speed is 4.5 m/s", "4.5 m/s", True),
    ("The answer is -9.81", "-9.81", True),
    ("The answer is 9.81", "-9.81", False),
    (r"\boxed{0}", "0", True),
    (r"\boxed{-\frac{3}{2}}", "-1.5", True),
    (r"Answer: $-\frac{1}{2}$", "-0.5", True),
    (r"\boxed{10^{-5}}", "1e-5", True),
    ("The answer is 1.0101", "1", False),  # 1.01 % of the reference value: outside 1 %
    ("The answer is 1.0099", "1", True),
    (r"\boxed{\sqrt{2}/2}", "0.70710678", True),  # not a plain number: the math checkers decide
    (r"\boxed{0.001}", "0", False),
    ("The answer is 12.", "12", True),
    ("no numbers here", "12", False),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", True),  # expressions go to the math checkers
    (r"\boxed{x^2}", r"2x", False),
])
def test_stem_reward(reward, response, truth, ok):
    res = reward.score(RewardInput(response=response, ground_truth=truth))
    assert (res.reward, res.correct, res.status) == (float(ok), ok, "ok"), res


def test_empty_truth_is_an_error(reward):
    res = reward.score(RewardInput(response="A", ground_truth="  "))
    assert res.status == "error" and "empty" in res.reason
