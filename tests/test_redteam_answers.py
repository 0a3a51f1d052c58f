"""Issue 29, item 5: answers that game a verifier without running any code. Each attack scores through the
real reward (worker pools, the installed reasoning-gym and Math-Verify); nothing under test is mocked."""

from __future__ import annotations

import pytest
import reasoning_gym

from nemo_prorl.config.schema import IFEvalRewardConfig, MathRewardConfig, RewardConfig
from nemo_prorl.rewards import RewardInput
from nemo_prorl.rewards.ifeval import IFEvalReward
from nemo_prorl.rewards.math_verifier import MathReward, answers_equal
from nemo_prorl.rewards.reasoning_gym import ReasoningGymReward

# ----------------------------------------------------------------------------------------------- math
# Math-Verify rejects each of these for 1000000007; the fallback's relative tolerance (1e-6) took them all.
NEAR_MISSES = ["1000000000", "1,000,000,000", "1.0e9", "1e9", "10^9", "1000000006", "1000000000.5",
               "1000000006.9999999", "1000000007.0000001"]


@pytest.fixture(scope="module")
def math_reward():
    r = MathReward(RewardConfig(math=MathRewardConfig(timeout_s=10.0, num_workers=2)))
    yield r
    r.close()


@pytest.mark.parametrize("pred", NEAR_MISSES)
def test_math_near_misses_of_an_integer_score_zero(math_reward, pred):
    assert not answers_equal(pred, "1000000007")
    res = math_reward.score(RewardInput(response=rf"\boxed{{{pred}}}", ground_truth="1000000007"))
    assert (res.reward, res.correct, res.status) == (0.0, False, "ok"), res


@pytest.mark.parametrize("pred,truth", [
    ("1000000007", "1,000,000,007"), ("1.000000007e9", "1000000007"), ("1000000007.0", "1000000007"),
    ("10^9", "1000000000"), ("1.0e9", "1000000000"), ("1,000,000,000", "1e9"),  # the same integer, written apart
    ("0.3333333", r"\frac{1}{3}"), (r"\frac{1}{7}", "0.1428571"), ("0.2857143", "2/7"),  # a rounded 1/3, 1/7, 2/7
    ("0.5", r"\frac{1}{2}"), ("2.50", "2.5"), ("12.5\\%", r"\frac18"),
])
def test_math_fallback_still_accepts_equal_and_rounded_answers(pred, truth):
    assert answers_equal(pred, truth) and answers_equal(truth, pred)


@pytest.mark.parametrize("pred,truth", [
    ("1000000.9", "1000000.5"), ("2.5000001", "2.5"), ("0.33", r"\frac{1}{3}"), ("0.3333334", "0.3333333"),
])
def test_math_fallback_compares_finite_decimals_exactly(pred, truth):
    """Two finite decimals are compared exactly: a rounding tolerance only makes sense against a value that
    no finite decimal can write (1/3), and 0.33 is not 1/3 to six digits. (Math-Verify, the other checker,
    rounds decimals to six places itself and accepts 2.5000001 for 2.5; integers it compares exactly.)"""
    assert not answers_equal(pred, truth) and not answers_equal(truth, pred)


# The tolerance applied whenever either side had no finite decimal form: a fraction near an integer, or two
# exact fractions within 1e-6 of each other, matched. A tolerance is rounding only: a fraction against a
# decimal written with k >= 1 fractional digits that is the fraction rounded or truncated to k digits.
FRACTION_NEAR_MISSES = [
    (r"\frac{3000000001}{3}", "1000000007"), (r"\frac{1}{3}", r"\frac{333334}{1000003}"),  # the review's
    ("3000000001/3", "1000000000"), (r"\frac{3000000001}{3000000000}", "1"),  # no fraction matches an integer
    ("0.334", r"\frac{1}{3}"), ("0.3334", r"\frac{1}{3}"), ("0.3332", r"\frac{1}{3}"),  # neither rounded nor cut
    ("0.66", r"\frac{2}{3}"), ("0.0", r"\frac{1}{45}"), ("0.02", r"\frac{1}{45}"),  # under 3 significant digits
    ("3.333e-1", r"\frac{1}{3}"), ("0.3330", r"\frac{1}{3}"), ("33.4\\%", r"\frac{1}{3}"),
]


@pytest.mark.parametrize("pred,truth", FRACTION_NEAR_MISSES)
def test_math_fractions_compare_exactly_but_against_a_rounded_decimal(math_reward, pred, truth):
    assert not answers_equal(pred, truth) and not answers_equal(truth, pred)
    res = math_reward.score(RewardInput(response=rf"\boxed{{{pred}}}", ground_truth=truth))
    assert (res.reward, res.correct, res.status) == (0.0, False, "ok"), res


@pytest.mark.parametrize("pred,truth", [
    ("0.333", r"\frac{1}{3}"), ("0.3333333", r"\frac{1}{3}"), ("0.667", r"\frac{2}{3}"),  # rounded
    ("0.666", r"\frac{2}{3}"), ("0.2857", "2/7"), ("0.285714", "2/7"), ("0.2857142", "2/7"),  # truncated
    ("-0.667", r"-\frac{2}{3}"), ("-0.666", r"\frac{-2}{3}"), ("1.33", r"\frac{4}{3}"), ("0.0222", r"\frac{1}{45}"),
    ("33.3\\%", r"\frac{1}{3}"), (r"\frac{2}{6}", r"\frac{1}{3}"), (r"\frac{9}{3}", "3"),  # exactly equal
])
def test_math_a_fraction_still_matches_its_rounded_decimal(pred, truth):
    assert answers_equal(pred, truth) and answers_equal(truth, pred)


# ------------------------------------------------------------------------------------------ countdown

@pytest.fixture(scope="module")
def rg_reward():
    r = ReasoningGymReward()
    yield r
    r.close()


def countdown_row(answer: str, numbers: list[int], target: int) -> RewardInput:
    meta = {"source_dataset": "countdown", "source_index": 0, "numbers": numbers, "target": target}
    question = f"Calculate {target} using all of these numbers: {', '.join(map(str, numbers))}.\n" \
               "Each number may be used at most once."
    return RewardInput(response=f"<think>hm</think><answer>{answer}</answer>", ground_truth="", prompt=question,
                       metadata={"reasoning_gym": {"task": "countdown", "entry_metadata": meta}})


# (answer, numbers, target): each reaches its target only with something + - * / cannot do
OPERATION_ATTACKS = [
    ("10**3+2-1", [10, 3, 2, 1], 1001),  # the issue's: 1001 is out of reach of 10, 3, 2, 1 with + - * /
    ("9**9**9**9", [9, 9, 9, 9], 100),  # a tower: must not even be computed
    ("7//2+100*1", [7, 2, 100, 1], 103),  # floor division
    ("7%4+100*1", [7, 4, 100, 1], 103),  # remainder
    ("1<<10-25+2", [1, 10, 25, 2], 1001),  # shifts and the other bit operations
    ("(6^3)*100+5", [6, 3, 100, 5], 505),
    ("(6|3)*100+5", [6, 3, 100, 5], 705),
    ("(6&3)*100+5", [6, 3, 100, 5], 205),
    ("-~99*(2+3)", [99, 2, 3], 500),  # unary tricks: -~x is x+1
    ("~-101*(2+3)", [101, 2, 3], 500),  # ~-x is x-1
    ("--100+-+-5", [100, 5], 105),  # a sign on a sign
    ("abs(-100)+5", [100, 5], 105),  # names and calls
    ("floor(E)*50+1", [50, 1], 101),
    ("100+True", [100], 101),
    ("100+1e0", [100], 101),  # numbers that are not the decimal integers given
    ("0x64+1", [100, 1], 101),
    ("100+1_0", [100, 10], 110),
    ("100+1.0", [100, 1], 101),
    ("1e2+1", [100, 1], 101),
]


@pytest.mark.parametrize("answer,numbers,target", OPERATION_ATTACKS)
def test_countdown_allows_only_the_tasks_operations(rg_reward, answer, numbers, target):
    res = rg_reward.score(countdown_row(answer, numbers, target))
    assert (res.reward, res.correct, res.status) == (0.0, False, "ok"), res
    assert res.info.get("tampered") == 1.0 and "arithmetic" in res.reason, res


@pytest.mark.parametrize("answer,numbers,target", [
    ("1000+1", [10, 3, 2, 1], 1001),  # numbers not given
    ("100+100+1", [100, 1, 50], 201),  # a number used twice
    ("100*2+1", [100, 2, 1, 7], 201),  # a number left out (the task says: all of these numbers)
    ("99999999*99999999*99999999*99999999", [9, 9], 100),  # a huge product of numbers not given
])
def test_countdown_numbers_must_be_the_puzzles(rg_reward, answer, numbers, target):
    """Upstream's score for an expression with the wrong numbers, 0.05, the same as a wrong value: breaking
    the rule earns no more than any wrong answer, never the reward."""
    res = rg_reward.score(countdown_row(answer, numbers, target))
    assert (res.reward, res.correct, res.status) == (0.05, False, "ok"), res


def test_countdown_is_scored_exactly(rg_reward):
    """np.isclose(atol=1e-6) upstream: 100 + 1/9999999 is not 100."""
    res = rg_reward.score(countdown_row("100+1/9999999", [100, 1, 9999999], 100))
    assert (res.reward, res.correct) == (0.05, False), res
    assert rg_reward.score(countdown_row("100*1+9999999-9999999", [100, 1, 9999999, 9999999], 100)).reward == 1.0


def test_countdown_right_answers_still_score_one(rg_reward):
    entries = list(reasoning_gym.create_dataset("countdown", size=400, seed=11))
    signed = [e for e in entries if e["answer"].lstrip().startswith("-")][:5]  # the oracle's leading minus
    assert signed
    rows = [countdown_row(e["answer"], e["metadata"]["numbers"], e["metadata"]["target"])
            for e in entries[:20] + signed]
    assert [r.reward for r in rg_reward.score_batch(rows)] == [1.0] * len(rows)
    assert rg_reward.score(countdown_row("(10 + 3) * 2 - 1", [10, 3, 2, 1], 25)).reward == 1.0
    assert rg_reward.score(countdown_row("10 / (3 - 1) * 2", [10, 3, 2, 1], 10)).reward == 1.0


def test_puzzle24_refuses_the_same_operations(rg_reward):
    e = reasoning_gym.create_dataset("puzzle24", size=1, seed=0)[0]
    a, b, c, d = e["metadata"]["numbers"]
    rg = {"task": "puzzle24", "entry_metadata": e["metadata"]}
    for attack in (f"{a}**{b}+{c}-{d}", f"{a}//{b}+{c}*{d}", f"-~{a}*{b}+{c}-{d}"):
        res = rg_reward.score(RewardInput(response=f"<answer>{attack}</answer>", ground_truth=e["answer"],
                                          prompt=e["question"], metadata={"reasoning_gym": rg}))
        assert (res.reward, res.info.get("tampered")) == (0.0, 1.0), (attack, res)
    right = rg_reward.score(RewardInput(response=f"<answer>{e['answer']}</answer>", ground_truth=e["answer"],
                                        prompt=e["question"], metadata={"reasoning_gym": rg}))
    assert right.reward == 1.0, right


# --------------------------------------------------------------------------------------------- IFEval
# Every instruction a prohibition: upstream IFEval says a near-empty answer follows them all.
PROHIBITIONS = {
    "instruction_id_list": ["punctuation:no_comma", "keywords:forbidden_words",
                            "change_case:capital_word_frequency", "keywords:letter_frequency",
                            "length_constraints:number_sentences"],
    "kwargs": [{}, {"forbidden_words": ["cat", "dog"]}, {"capital_frequency": 1, "capital_relation": "less than"},
               {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
               {"num_sentences": 3, "relation": "less than"}],
}
PROMPT = ("Write a short note about the river behind your house. Do not use any commas, capital letters, "
          "the words cat or dog, or the letter z more than once, in fewer than three sentences.")
NEAR_EMPTY = [".", "1", "ok", "Ok.", "...", "!!!", "12345", "1 2 3 4 5 6 7 8", "ok ok ok ok ok ok ok",
              "a a a a a a a a", "a b c d e f g", "<think>a long plan</think>ok", "- - - - -", "okay sure"]
REAL = "the river behind my house runs slow and brown under an old stone bridge where herons wait for fish"


def if_row(response: str) -> RewardInput:
    return RewardInput(response=response, ground_truth="", prompt=PROMPT, metadata=dict(PROHIBITIONS))


@pytest.mark.parametrize("answer", NEAR_EMPTY)
def test_ifeval_near_empty_answers_earn_nothing_in_training(answer):
    gated = IFEvalReward(RewardConfig()).score(if_row(answer))  # the training default
    assert (gated.reward, gated.correct, gated.status) == (0.0, False, "ok"), gated
    assert gated.info["no_attempt"] == 1.0 and "no attempt" in gated.reason, gated
    # upstream IFEval semantics, which `prorl eval` keeps: each follows every prohibition
    upstream = IFEvalReward(RewardConfig(ifeval=IFEvalRewardConfig(require_attempt=False))).score(if_row(answer))
    assert (upstream.reward, upstream.correct) == (1.0, True) and "no_attempt" not in upstream.info, upstream


def test_ifeval_a_real_answer_still_scores_one_in_training():
    res = IFEvalReward(RewardConfig()).score(if_row(REAL))
    assert (res.reward, res.correct, res.info["no_attempt"]) == (1.0, True, 0.0), res


def test_ifeval_the_gate_follows_a_rows_own_length_limit():
    """An answer the row itself caps below the gate's minimum ("fewer than 4 words", IFEval's fixed
    replies) is an attempt at that length."""
    short = {"instruction_id_list": ["length_constraints:number_words", "punctuation:no_comma"],
             "kwargs": [{"num_words": 4, "relation": "less than"}, {}]}
    reply = {"instruction_id_list": ["detectable_format:constrained_response", "punctuation:no_comma"],
             "kwargs": [{}, {}]}
    r = IFEvalReward(RewardConfig())
    assert r.score(RewardInput("Rivers run deep.", "", metadata=short)).reward == 1.0
    assert r.score(RewardInput(". .", "", metadata=short)).reward == 0.0
    assert r.score(RewardInput("My answer is yes.", "", metadata=reply)).reward == 1.0


def _under(n: int) -> dict:
    return {"instruction_id_list": ["length_constraints:number_words", "keywords:forbidden_words"],
            "kwargs": [{"num_words": n, "relation": "less than"}, {"forbidden_words": ["cat"]}]}


@pytest.mark.parametrize("answer,n,expected", [
    ("Yes, it is a dog", 6, 1.0),  # 4 distinct words of 2+ letters: the gate asked for 5 (N - 1)
    ("It is a dog.", 6, 1.0), ("A dog, I think.", 6, 1.0),
    ("Yes, it is a cat", 6, 0.5),  # an attempt, judged by the instructions: the forbidden word
    ("ok ok", 6, 0.0), (". . .", 6, 0.0), ("a b c d", 6, 0.0),  # under 2 distinct words: no attempt
    (".", 300, 0.0), ("ok", 300, 0.0), ("ok ok ok", 300, 0.0), ("it is ok", 300, 0.0),  # a large limit: 5 as before
])
def test_ifeval_a_short_answer_under_a_small_word_limit_is_judged_by_the_instructions(answer, n, expected):
    """Under "fewer than N words" the gate asks for max(1, (N - 1) // 2) distinct words, not N - 1: a real
    short answer repeats words and uses one-letter ones ("a", "I")."""
    res = IFEvalReward(RewardConfig()).score(RewardInput(answer, "", metadata=_under(n)))
    assert res.reward == expected, res


def test_ifeval_repeating_the_request_is_no_attempt():
    request = "Write a short note about the river behind your house without commas."
    row = {"instruction_id_list": ["combination:repeat_prompt", "punctuation:no_comma"],
           "kwargs": [{"prompt_to_repeat": request}, {}]}
    r = IFEvalReward(RewardConfig())
    echo = r.score(RewardInput(f"{request} ok", "", metadata=row))
    assert (echo.reward, echo.info["no_attempt"]) == (0.0, 1.0), echo
    assert r.score(RewardInput(f"{request}\n{REAL}", "", metadata=row)).reward == 1.0


def test_ifeval_answers_in_scripts_without_spaces_are_attempts():
    row = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    r = IFEvalReward(RewardConfig())
    assert r.score(RewardInput("川の水は静かに流れています。", "", metadata=row)).reward == 1.0
    assert r.score(RewardInput("แม่น้ำไหลช้าๆ ผ่านหมู่บ้าน", "", metadata=row)).reward == 1.0
    assert r.score(RewardInput("川川川川川川", "", metadata=row)).reward == 0.0
