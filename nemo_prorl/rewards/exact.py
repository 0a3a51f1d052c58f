"""Exact answers: integers (the last one in the response) and whole-string matches."""

from __future__ import annotations

import re

from nemo_prorl.rewards.base import REWARDS, RewardInput, RewardResult

_INT = re.compile(r"-?\d+")


class ArithmeticReward:
    def score(self, inp: RewardInput) -> RewardResult:
        found = _INT.findall(inp.response)
        if not found:
            return RewardResult(0.0, correct=False, reason="no integer in the response")
        ok = int(found[-1]) == int(inp.ground_truth)
        return RewardResult(1.0 if ok else 0.0, correct=ok)


REWARDS.register("arithmetic")(lambda cfg=None: ArithmeticReward())


class ExactMatchReward:
    """The whole response, stripped of surrounding white space, must equal the ground truth."""

    def score(self, inp: RewardInput) -> RewardResult:
        ok = inp.response.strip() == inp.ground_truth.strip()
        return RewardResult(1.0 if ok else 0.0, correct=ok)


REWARDS.register("exact_match")(lambda cfg=None: ExactMatchReward())
