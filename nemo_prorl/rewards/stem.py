"""STEM answers (reward "stem"): GPQA-style multiple choice and SCP-116K-style numeric or symbolic answers.

The ground truth decides the kind:
  a letter A-J ("C", "(C)", "C)")      -> the response's last stated choice must be that letter;
  a number ("4.5", "3.2e-5", "3.2 \\times 10^{-5}", "4.5 m/s") -> equal within `reward.stem_rel_tol`
                                         (answers are often rounded), exact zero within 1e-9;
  anything else (an expression)       -> the math checkers (Math-Verify or the sympy grader), in a worker
                                         process with the math time limit.
Only the text after `</think>` is read. Binary reward.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import Any, Optional

from nemo_prorl.rewards.base import REWARDS, RewardInput, RewardResult, failed
from nemo_prorl.rewards.extract import last_boxed, last_tag, strip_thinking
from nemo_prorl.rewards.math_verifier import CHECKER_MODULES, verdict
from nemo_prorl.rewards.math_verifier import check as math_check
from nemo_prorl.rewards.workers import HardTimeoutPool

_LETTER_TRUTH = re.compile(r"\(?([A-Ja-j])\)?\.?")
# "Answer: (C)", "answer is C", "The correct answer is **C**", "Final Answer: C." and "option C"; the
# letter must stand alone, so "A good way" or "Answer: Because" do not count.
_STATED = re.compile(
    r"(?:answer|option|choice)\s*(?:is|:|=)?\s*(?:\\boxed\{)?\s*[*_]*\s*(?:\\text\{)?\(?([A-J])\)?(?![A-Za-z])",
    re.IGNORECASE)
_BOXED_LETTER = re.compile(r"^(?:\\text\{)?\s*\(?([A-J])\)?\s*\}?\.?$")
_ALONE = re.compile(r"^\W*\(?([A-J])\)?\W*$")


def extract_choice(text: str) -> Optional[str]:
    """The last stated choice letter: from `\\boxed{}`, an `<answer>` tag, an "answer is ..." statement, or a
    response that is a letter alone; None if nothing qualifies."""
    found: list[tuple[int, str]] = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        inner = last_boxed(text[m.start():])
        if inner is not None and (b := _BOXED_LETTER.match(inner.strip())):
            found.append((m.start(), b.group(1).upper()))
    tag = last_tag(text, "answer")
    if tag is not None and (b := _ALONE.match(tag)):
        found.append((text.rfind("<answer>"), b.group(1).upper()))
    for m in _STATED.finditer(text):
        # "answer is a" in prose: a lower-case letter counts only after a colon ("Answer: c")
        if m.group(1).isupper() or ":" in m.group(0):
            found.append((m.start(), m.group(1).upper()))
    if not found and (b := _ALONE.match(text.strip())):
        return b.group(1).upper()
    return max(found)[1] if found else None


_SCI = [
    (re.compile(r"\\times|×|\\cdot|\*"), "*"),
    (re.compile(r"\^\{([^{}]*)\}"), r"^\1"),
    (re.compile(r"\*\*"), "^"),
]
_NUMBER = re.compile(
    r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*\*\s*10\s*\^\s*[-+−]?\d+)?")


def parse_number(s: str) -> Optional[float]:
    """A number in plain, scientific (`3.2e-5`, `3.2 \\times 10^{-5}`, `3.2×10^-5`, `3.2*10**-5`) or
    \\frac{a}{b} notation, optionally followed by units; None if `s` does not start with one."""
    t = s.strip().strip("$").strip().replace("−", "-")
    t = re.sub(r"^([-+])\s+", r"\1", t)  # "- 4.5"
    t = re.sub(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", r"(\1)/(\2)", t)
    frac = re.fullmatch(r"([-+]?)\(?\s*(-?[\d.]+)\s*\)?\s*/\s*\(?\s*(-?[\d.]+)\s*\)?(?:\s*\\?\w.*)?", t)
    if frac:
        try:
            return float(frac.group(2)) / float(frac.group(3)) * (-1.0 if frac.group(1) == "-" else 1.0)
        except (ValueError, ZeroDivisionError):
            return None
    power = re.fullmatch(r"([-+]?)10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?", t)  # a bare power of ten
    if power:
        return (-1.0 if power.group(1) == "-" else 1.0) * 10.0 ** int(power.group(2))
    for pat, rep in _SCI:
        t = pat.sub(rep, t)
    t = t.replace("−", "-").replace("\\,", "").replace("{,}", ",")
    m = _NUMBER.match(t)
    if not m or not re.search(r"\d", m.group(0)):
        return None
    rest = t[m.end():].strip()
    if rest and not re.match(r"(?:\\text\{|\\mathrm\{|\\,|~|[a-zA-Zµμ°%Ω/\\])", rest):
        return None  # "3 + 4" is an expression, not a number with units
    num = m.group(0).replace(",", "")
    base, _, exp = num.partition("*")
    try:
        v = float(base)
        if exp:
            v *= 10.0 ** float(exp.split("^")[1].replace(" ", ""))
    except (ValueError, IndexError, OverflowError):
        return None
    return v


_ANSWER_IS = re.compile(r"(?:answer|result)\s*(?:is|:|=)\s*(.+)", re.IGNORECASE)
_ANY_NUMBER = re.compile(r"[-+−]?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*(?:[eE]|\\times\s*10\^|×\s*10\^)\s*\{?[-+−]?\d+\}?)?")


def extract_number(text: str) -> Optional[float]:
    """The response's number: the last `\\boxed{}`, else the last "answer is ..." statement, else the last
    number in the text."""
    boxed = last_boxed(text)
    if boxed is not None:
        return parse_number(boxed)
    stated = _ANSWER_IS.findall(text)
    if stated and (v := parse_number(stated[-1].strip().rstrip("."))) is not None:
        return v
    nums = _ANY_NUMBER.findall(text)
    return parse_number(nums[-1]) if nums else None


class StemReward:
    def __init__(self, cfg: Any = None) -> None:
        self.rel_tol = float(getattr(cfg, "stem_rel_tol", 0.01))
        self.timeout_s = float(getattr(getattr(cfg, "math", None), "timeout_s", 5.0))
        self._pool: Optional[HardTimeoutPool] = None  # expression answers go through the math checkers
        self._lock = threading.Lock()

    def _expression(self, pred: str, truth: str) -> RewardResult:
        with self._lock:
            if self._pool is None:
                self._pool = HardTimeoutPool(1, preload=CHECKER_MODULES)
        res = verdict(self._pool.call(math_check, (pred, truth), self.timeout_s))
        return dataclasses.replace(res, info={**res.info, "multiple_choice": 0.0})

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def score(self, inp: RewardInput) -> RewardResult:
        truth = inp.ground_truth.strip()
        text = strip_thinking(inp.response)
        if not truth:
            return failed("error", "empty ground truth")
        if _LETTER_TRUTH.fullmatch(truth):
            letter = _LETTER_TRUTH.fullmatch(truth).group(1).upper()  # type: ignore[union-attr]
            got = extract_choice(text)
            ok = got == letter
            return RewardResult(float(ok), correct=ok, reason="" if got else "no choice letter found",
                                info={"multiple_choice": 1.0})
        target = parse_number(truth)
        if target is not None:
            got_num = extract_number(text)
            if got_num is None:
                pred = last_boxed(text) or (_ANSWER_IS.findall(text) or [None])[-1]
                if pred is None:
                    return RewardResult(0.0, correct=False, reason="no number found", info={"multiple_choice": 0.0})
                return self._expression(pred.strip().rstrip("."), truth)  # e.g. \sqrt{2}/2 against 0.7071
            # relative to the reference value, not to the larger of the two (math.isclose's rule)
            ok = abs(got_num - target) <= (1e-9 if target == 0 else self.rel_tol * abs(target))
            return RewardResult(float(ok), correct=ok, info={"multiple_choice": 0.0})
        pred = last_boxed(text) or (_ANSWER_IS.findall(text) or [None])[-1]
        if pred is None:
            return RewardResult(0.0, correct=False, reason="no final answer found", info={"multiple_choice": 0.0})
        return self._expression(pred.strip().rstrip("."), truth)


REWARDS.register("stem")(StemReward)
