"""Math answers (reward "math"). ProRL §3.1 scored math with DeepScaleR's verifier or Math-Verify, reward 1
if either accepts. We extract the last `\\boxed{}` after the thinking block and accept it if Math-Verify
does, or if a sympy-based grader in the style of DeepScaleR/PRM800K does (after removing LaTeX formatting
noise and units, comparing fractions/decimals/percentages as exact rationals; a decimal matches a value no finite
decimal can write, such as 1/3, only as its rounding or truncation (0.333); intervals, tuples, sets and matrices
element by element). Binary reward.

Both checkers run in a `HardTimeoutPool` worker with a per-call time limit, so an expression that makes
sympy spin cannot hang scoring; such a call is recorded with status "timeout".
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from fractions import Fraction
from typing import Any, Optional, Sequence

from nemo_prorl.confine import HardTimeoutPool, Outcome
from nemo_prorl.rewards.base import REWARDS, RewardInput, RewardResult, failed
from nemo_prorl.rewards.extract import code_like, last_boxed, strip_thinking

# ----------------------------------------------------------------------------------- normalisation
_REMOVE = [r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\quad", r"\qquad", r"\displaystyle", "$",
           r"\mathrm", r"\mathbf", r"\textstyle"]
_UNIT_WORDS = ("degrees", "degree", "units", "unit", "cm", "meters", "meter", "inches", "inch", "feet",
               "foot", "dollars", "cents", "square", "sq", "km", "mph", "hours", "minutes", "seconds")


def normalize(ans: str) -> str:
    """Strip what graders treat as formatting noise: spacing commands, \\left/\\right, dfrac/tfrac, degree
    signs, trailing units in \\text{}, `x =` prefixes, thousands separators, a trailing period."""
    s = ans.strip()
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{\s*(?:" + "|".join(_UNIT_WORDS) + r")(?:\^?\{?\d\}?)?\s*\}", "", s)
    for tok in _REMOVE:
        s = s.replace(tok, "")
    s = re.sub(r"\\(?:text|textbf|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = s.replace("\\%", "%").replace("\\$", "")
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = re.sub(r"\s+(?:" + "|".join(_UNIT_WORDS) + r")\b\.?$", "", s)
    s = s.strip().rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    return s


_NUM = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d{1,4})?")  # an exponent of 5+ digits is left to sympy


def to_number(s: str) -> Optional[Fraction]:
    """The exact value of a plain number, a/b, \\frac{a}{b}, -\\frac{a}{b}, or a percentage (its value / 100).
    Exact (a decimal string is the fraction it writes: `1.0e9` is 10^9), so that `_close` can tell an
    integer from a near miss."""
    pct = s.endswith("%")
    s = s.rstrip("%")
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s) or re.fullmatch(r"(-?)(-?[\d.]+)/(-?[\d.]+)", s)
    try:
        if m:
            v = Fraction(m.group(2)) / Fraction(m.group(3)) * (-1 if m.group(1) else 1)
        elif _NUM.fullmatch(s):
            v = Fraction(s)
        else:
            return None
    except (ValueError, ZeroDivisionError):
        return None
    return v / 100 if pct else v


def _finite_decimal(x: Fraction) -> bool:
    """Whether x can be written as a finite decimal: its denominator has no prime factor but 2 and 5."""
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


_DECIMAL = re.compile(r"-?(\d*)\.(\d+)(%?)")
# A rounded decimal must carry this many significant digits: 0.333 is 1/3 written rounded, 0.33 or 0.3 say
# little more than "about a third" (and 0.0 would match any fraction under 1/20).
_MIN_SIGNIFICANT = 3


def _decimal_digits(s: str) -> Optional[tuple[int, int]]:
    """(fractional digits of the value, significant digits) of a plainly written decimal such as 0.333 or
    33.3% (a percentage's value has two more), or None for every other form: integers, fractions,
    exponents."""
    m = _DECIMAL.fullmatch(s)
    if not m:
        return None
    return len(m.group(2)) + (2 if m.group(3) else 0), len((m.group(1) + m.group(2)).lstrip("0"))


def rounds_to(x: Fraction, dec: Fraction, k: int) -> bool:
    """Whether `dec` is `x` rounded to the nearest, or truncated toward zero, at k fractional digits."""
    scaled, d = x * 10**k, dec * 10**k
    return d.denominator == 1 and d.numerator in (int(scaled), round(scaled))


def _close(a: Fraction, sa: str, b: Fraction, sb: str) -> bool:
    """Equal (exact rationals), or one side has no finite decimal form (1/3, 2/7) and the other, `sa` or `sb`
    as written, is a decimal with k >= 1 fractional digits and 3+ significant digits that is that value
    rounded or truncated to k digits (0.333, 0.3333333, 0.2857): the only way to write such a value as a
    decimal. Nothing else has a tolerance: integers compare exactly (a relative 1e-6 accepted 1000000000 for
    1000000007, and \\frac{3000000001}{3} for it), and so do two fractions (1/3 is not 333334/1000003)."""
    if a == b:
        return True
    for exact, dec, written in ((a, b, sb), (b, a, sa)):
        digits = None if _finite_decimal(exact) else _decimal_digits(written)
        if digits and digits[0] >= 1 and digits[1] >= _MIN_SIGNIFICANT and rounds_to(exact, dec, digits[0]):
            return True
    return False


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets/braces."""
    parts, depth, cur = [], 0, ""
    i = 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if depth == 0 and s.startswith(sep, i):
            parts.append(cur)
            cur = ""
            i += len(sep)
            continue
        cur += c
        i += 1
    parts.append(cur)
    return [p.strip() for p in parts]


def _sympy_equal(a: str, b: str) -> bool:
    from latex2sympy2_extended import latex2sympy
    import sympy

    ea, eb = latex2sympy(a), latex2sympy(b)
    if ea == eb:
        return True
    try:
        return bool(sympy.simplify(ea - eb) == 0)
    except (TypeError, AttributeError):
        return bool(ea.equals(eb))


def scalar_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    na, nb = to_number(a), to_number(b)
    if na is not None and nb is not None:
        if _close(na, a, nb, b):
            return True
        # "50%" against "50": percentages are often written either way
        if a.endswith("%") != b.endswith("%"):
            a, b = a.rstrip("%"), b.rstrip("%")
            return _close(to_number(a), a, to_number(b), b)  # type: ignore[arg-type]
        return False
    try:
        return _sympy_equal(a, b)
    except Exception:  # noqa: BLE001  unparseable LaTeX is simply "not equal"
        return False


_MATRIX = re.compile(r"\\begin\{[pbvBV]?matrix\}(.*)\\end\{[pbvBV]?matrix\}")


def _matrix(s: str) -> Optional[list[list[str]]]:
    m = _MATRIX.fullmatch(s)
    return [[c.strip() for c in row.split("&")] for row in m.group(1).split("\\\\") if row.strip()] if m else None


def answers_equal(pred: str, truth: str) -> bool:
    """The DeepScaleR-style fallback: structural comparison over normalised strings, sympy for scalars."""
    p, t = normalize(pred), normalize(truth)
    if p == t:
        return True
    mp_, mt = _matrix(p), _matrix(t)
    if mp_ is not None or mt is not None:
        return (mp_ is not None and mt is not None and [len(r) for r in mp_] == [len(r) for r in mt]
                and all(scalar_equal(x, y) for rp, rt in zip(mp_, mt) for x, y in zip(rp, rt)))
    for open_, close_ in (("\\{", "\\}"), ("{", "}")):
        if p.startswith(open_) and p.endswith(close_) and t.startswith(open_) and t.endswith(close_):
            ep = _split_top(p[len(open_):-len(close_)])
            et = _split_top(t[len(open_):-len(close_)])
            return _multiset_equal(ep, et)
    if p[:1] in "([" and p[-1:] in ")]" and t[:1] in "([" and t[-1:] in ")]":
        if (p[0], p[-1]) != (t[0], t[-1]):
            return False  # [0,1) is not (0,1)
        ep, et = _split_top(p[1:-1]), _split_top(t[1:-1])
        return len(ep) == len(et) and all(scalar_equal(x, y) for x, y in zip(ep, et))
    ep, et = _split_top(p), _split_top(t)
    if len(ep) > 1 or len(et) > 1:  # "1, 2" answers to "find all x": order does not matter
        return _multiset_equal(ep, et)
    return scalar_equal(p, t)


def _multiset_equal(a: Sequence[str], b: Sequence[str]) -> bool:
    left = list(b)
    if len(a) != len(b):
        return False
    for x in a:
        hit = next((i for i, y in enumerate(left) if scalar_equal(x, y)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


# imported by each worker before its first call, so that a call's time limit is not spent importing them
CHECKER_MODULES = ("sympy", "math_verify")


def math_verify_equal(pred: str, truth: str) -> bool:
    """Math-Verify's verdict. Its own signal-based time outs are off: they turn a time out into a silent
    "wrong", while the pool's hard limit records it as a time out."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that time outs are off
    gold = parse(truth if "\\boxed" in truth or "$" in truth else f"${truth}$", parsing_timeout=None)
    target = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    return bool(gold and target and verify(gold, target, timeout_seconds=None))


def check(arg: tuple[str, str]) -> dict[str, Any]:
    """Worker entry point: (extracted answer, ground truth) -> verdicts of both checkers."""
    pred, truth = arg
    mv = False
    mv_error = ""
    try:
        mv = math_verify_equal(pred, truth)
    except Exception as e:  # noqa: BLE001  one checker failing leaves the other
        mv_error = f"{type(e).__name__}: {e}"
    fb = False if mv else answers_equal(pred, truth)  # only consulted when Math-Verify says no
    return {"math_verify": mv, "fallback_only": fb, "error": mv_error}


def warm(arg: tuple[str, str]) -> bool:
    """`prepare` for `check`: the first time a worker sees a ground truth, check it against itself (trusted
    data), so that Math-Verify's and sympy's lazily built state exists before any answer is evaluated
    (the worker's StateGuard then takes it in, and does not mistake it for an answer's tampering)."""
    truth = arg[1]
    if truth in _WARMED or len(_WARMED) > 100_000:
        return False
    _WARMED.add(truth)
    check((truth, truth))
    return True


_WARMED: set[str] = set()


def verdict(o: Outcome) -> RewardResult:
    """The reward for one `check` call run in a worker: 1 if either checker accepts (ProRL §3.1); the pool's
    error or time out as the row's status."""
    if o.status == "tampered":  # a hostile answer: wrong, not a verifier failure
        return RewardResult(0.0, correct=False, reason=o.reason, info={"tampered": 1.0})
    if o.status != "ok":
        return failed(o.status, o.reason)  # type: ignore[arg-type]
    ok = bool(o.value["math_verify"] or o.value["fallback_only"])
    return RewardResult(float(ok), correct=ok, reason=o.value["error"],
                        info={"math_verify": float(o.value["math_verify"]), "fallback_only": float(o.value["fallback_only"])})


VERDICT_CACHE = 1 << 16  # (answer, truth) verdicts kept per reward instance


class MathReward:
    def __init__(self, cfg: Any = None) -> None:
        mcfg = getattr(cfg, "math", None)
        self.timeout_s = float(getattr(mcfg, "timeout_s", 5.0))
        self.pool = HardTimeoutPool(int(getattr(mcfg, "num_workers", 2)), preload=CHECKER_MODULES)
        # verdicts are deterministic in (answer, truth): the n samples of a prompt often repeat an answer,
        # and each check runs in a fresh forked process that keeps no cache of its own (confine/workers.py)
        self._verdicts: "OrderedDict[tuple[str, str], RewardResult]" = OrderedDict()
        self._lock = threading.Lock()

    def score(self, inp: RewardInput) -> RewardResult:
        return self.score_batch([inp])[0]

    def _remember(self, key: tuple[str, str], res: RewardResult) -> None:
        if res.status != "ok":  # time outs and worker failures are not the answer's verdict
            return
        with self._lock:
            self._verdicts[key] = res
            if len(self._verdicts) > VERDICT_CACHE:
                self._verdicts.popitem(last=False)

    def score_batch(self, inputs: Sequence[RewardInput]) -> list[RewardResult]:
        out: list[Optional[RewardResult]] = [None] * len(inputs)
        jobs, rows = [], []
        for i, inp in enumerate(inputs):
            pred = last_boxed(strip_thinking(inp.response))
            if not inp.ground_truth.strip():
                out[i] = failed("error", "empty ground truth")
            elif pred is None:
                out[i] = RewardResult(0.0, correct=False, reason="no \\boxed{} answer")
            elif code_like(pred):  # the sympy fallback evaluates the answer: code is refused before it
                out[i] = RewardResult(0.0, correct=False, reason="the answer is Python code, not an answer",
                                      info={"tampered": 1.0})
            else:
                with self._lock:
                    out[i] = self._verdicts.get((pred, inp.ground_truth))
                if out[i] is None:
                    jobs.append((pred, inp.ground_truth))
                    rows.append(i)
        todo = list(dict.fromkeys(jobs))  # each distinct (answer, truth) once
        results = dict(zip(todo, (verdict(o) for o in self.pool.map(check, todo, timeout=self.timeout_s,
                                                                   prepare=warm))))
        for i, job in zip(rows, jobs):
            out[i] = results[job]
            self._remember(job, results[job])
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.pool.close()


REWARDS.register("math")(MathReward)
