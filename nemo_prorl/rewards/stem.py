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

import bisect
import dataclasses
import re
import threading
from typing import Any, Optional

from nemo_prorl.confine import HardTimeoutPool
from nemo_prorl.rewards.base import REWARDS, RewardInput, RewardResult, failed
from nemo_prorl.rewards.extract import (
    BOXED_BARE, BOXED_OPEN, last_boxed, last_tag, matching_braces, strip_thinking,
)
from nemo_prorl.rewards.math_verifier import CHECKER_MODULES, verdict, warm
from nemo_prorl.rewards.math_verifier import check as math_check

# Extraction runs on the policy's output in the trainer's threads with no time limit, so everything below
# takes time linear in the response: no regex here has two quantifiers that can share a character
# (`\s*(?:is)?\s*` backtracks over every split of a run of spaces: cubic and worse), and boxes are read in
# one brace-matching pass rather than one scan per `\boxed{`.

_LETTER_TRUTH = re.compile(r"\(?([A-Ja-j])\)?\.?")
# "Answer: (C)", "answer is C", "The correct answer is **C**", "Final Answer: C." and "option C"; the
# letter must stand alone, so "A good way" or "Answer: Because" do not count. Each optional token carries
# the spaces after it, so that no two `\s*` meet (the same strings and matches as
# `\s*(?:is|:|=)?\s*(?:\\boxed\{)?\s*[*_]*\s*(?:\\text\{)?`, without its backtracking).
_STATED = re.compile(
    r"(?:answer|option|choice)\s*(?:(?:is|:|=)\s*)?(?:\\boxed\{\s*)?(?:[*_]+\s*)?(?:\\text\{)?\(?([A-J])\)?"
    r"(?![A-Za-z])",
    re.IGNORECASE)
_BOXED_LETTER = re.compile(r"(?:\\text\{)?\s*\(?([A-J])\)?\s*\}?\.?")  # the whole (stripped) box content
_ALONE = re.compile(r"^\W*\(?([A-J])\)?\W*$")
_NON_SPACE = re.compile(r"\S")


def _letter_in(text: str, start: int, end: int) -> Optional[str]:
    """The choice letter if text[start:end], stripped, is one (`C`, `(C)`, `\\text{C}`), else None; no
    copy of the span."""
    first = _NON_SPACE.search(text, start, end)
    if first is None:
        return None
    start = first.start()
    while text[end - 1].isspace():  # str.strip's and `\s`'s spaces are the same characters
        end -= 1
    m = _BOXED_LETTER.fullmatch(text, start, end)
    return m.group(1).upper() if m else None


class _BareBoxes:
    """`\\boxed X` (no braces) answers, read as a left-to-right `finditer` from a given position reads them:
    matches do not overlap, so where a scan starts can decide which `\\boxed ` it takes up (in
    `\\boxed \\boxed A` the scan from the start reads `\\boxed`, the one from the second reads `A`)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.starts: list[int] = []
        self.spans: list[tuple[int, int]] = []
        i = text.find("\\boxed ")
        while i >= 0:
            if m := BOXED_BARE.match(text, i):
                self.starts.append(i)
                self.spans.append(m.span(1))
            i = text.find("\\boxed ", i + 1)
        # last[k]: the last match of a scan whose first match is k (a scan goes on at the end of each match)
        self.last = list(range(len(self.starts)))
        for k in reversed(range(len(self.starts))):
            nxt = bisect.bisect_left(self.starts, self.spans[k][1])
            if nxt < len(self.starts):
                self.last[k] = self.last[nxt]

    def letter_from(self, pos: int) -> Optional[str]:
        """The letter of the last `\\boxed X` a scan from `pos` finds, if that X is one; else None."""
        k = bisect.bisect_left(self.starts, pos)
        if k == len(self.starts):
            return None
        start, end = self.spans[self.last[k]]
        return _letter_in(self.text, start, end)


def _boxed_choices(text: str) -> list[tuple[int, str]]:
    """(position, letter) for each `\\boxed{`/`\\fbox{` that reads as a choice. A box reads as what
    `last_boxed` finds in the text from it on, as the rule has always been: the last closed box of the
    text, for the boxes up to it (so in `\\boxed{B} ... \\boxed{42}` B reads as 42, no letter), and for
    the unclosed boxes after it, the last `\\boxed X` a scan from them finds."""
    boxes = list(BOXED_OPEN.finditer(text))
    if not boxes:
        return []
    partner = matching_braces(text, boxes[0].end() - 1)
    bare: Optional[_BareBoxes] = None
    found = []
    closed_seen, letter = False, None
    for m in reversed(boxes):
        if not closed_seen:  # once a closed box is seen, every box before it reads as that one
            end = partner.get(m.end() - 1)
            if end is not None:
                closed_seen, letter = True, _letter_in(text, m.end(), end)
            else:
                bare = bare or _BareBoxes(text)
                letter = bare.letter_from(m.start())
        if letter is not None:
            found.append((m.start(), letter))
    return found


def extract_choice(text: str) -> Optional[str]:
    """The last stated choice letter: from `\\boxed{}`, an `<answer>` tag, an "answer is ..." statement, or a
    response that is a letter alone; None if nothing qualifies."""
    found = _boxed_choices(text)
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
# "a/b", "-(a)/(b)", optionally followed by units: the sign, numerator and denominator; the spaces around
# an optional parenthesis belong to it, so that no two `\s*` meet
_FRACTION = re.compile(r"([-+]?)\(?\s*(-?[\d.]+)\s*(?:\)\s*)?/\s*(?:\(\s*)?(-?[\d.]+)")
_FRACTION_TAIL = re.compile(r"\s*(?:\)(?:\s*\\?\w[^\n]*)?|\\?\w[^\n]*)?")  # the rest: ")", units
_POWER = re.compile(r"([-+]?)10\s*\^\s*(?:\{\s*)?([-+]?\d+)\s*\}?")  # a bare power of ten


def _fraction(t: str) -> Optional[tuple[str, str, str]]:
    """(sign, numerator, denominator) of a whole-string fraction, as the regex
    `([-+]?)\\(?\\s*(-?[\\d.]+)\\s*\\)?\\s*/\\s*\\(?\\s*(-?[\\d.]+)\\s*\\)?(?:\\s*\\\\?\\w.*)?` fullmatches it
    (backtracking included: with "1/22+3" the denominator gives its last digit to the units, "2+3"), in
    linear time."""
    m = _FRACTION.match(t)
    if m is None:
        return None
    if _FRACTION_TAIL.fullmatch(t, m.end()):
        return m.group(1), m.group(2), m.group(3)
    # Shorter denominators: the rest then starts with a digit (a word character) and matches iff no
    # newline follows; a "." cannot start it. So only the longest one ending before a digit can match.
    first = m.start(3) + (t[m.start(3)] == "-") + 1
    end = m.end() - 1
    while end >= first and t[end] == ".":
        end -= 1
    if end >= first and _FRACTION_TAIL.fullmatch(t, end):
        return m.group(1), m.group(2), t[m.start(3):end]
    return None


def parse_number(s: str) -> Optional[float]:
    """A number in plain, scientific (`3.2e-5`, `3.2 \\times 10^{-5}`, `3.2×10^-5`, `3.2*10**-5`) or
    \\frac{a}{b} notation, optionally followed by units; None if `s` does not start with one."""
    t = s.strip().strip("$").strip().replace("−", "-")
    t = re.sub(r"^([-+])\s+", r"\1", t)  # "- 4.5"
    t = re.sub(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", r"(\1)/(\2)", t)
    frac = _fraction(t)
    if frac:
        sign, num, den = frac
        try:
            return float(num) / float(den) * (-1.0 if sign == "-" else 1.0)
        except (ValueError, ZeroDivisionError):
            return None
    power = _POWER.fullmatch(t)
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
        res = verdict(self._pool.call(math_check, (pred, truth), self.timeout_s, prepare=warm))
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
