"""IFEval's training-time gate (`reward.ifeval.require_attempt`, issue 29): an answer that does not attempt
the prompt earns nothing in training. `prorl eval` keeps upstream IFEval's semantics (gate off)."""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Mapping, Sequence

# Upstream IFEval scores '.', '1' or 'ok' 1.0 on a row whose instructions are all prohibitions (no commas,
# no capitals, no forbidden words): nothing was said, so nothing was broken. Evaluation keeps that, but a
# policy trained on it learns to say nothing. In training, an answer must first attempt the prompt: it has
# at least `min_distinct_words` distinct words. Distinct, so that padding ('a a a a a', 'ok ok ok') is no
# attempt; a word has two or more letters, so that digits, punctuation and single letters ('a b c d e')
# are none. In scripts written without spaces (Chinese, Japanese, Thai, Lao, Khmer, Burmese), where a
# sentence would be one "word", each character counts as one. Deliberately not required: words of the
# prompt, since IFEval asks for answers in other languages and casings (and copying the prompt's words
# would be as cheap to learn as the filler it is meant to stop). A row's own length limit lowers the
# minimum, and IFEval's fixed replies ("My answer is yes.") have 4. "Fewer than N words" allows N - 1
# words, but a real answer that short repeats words and uses one-letter ones ("Yes, it is a dog": 4 of 5
# count; "A dog, I think.": 3 of 4), so the gate asks for half of them, and at least one: the answer
# must say something, and the length instruction judges the rest. For N >= 11 that is the usual 5.
# A request the row says to repeat first (combination:repeat_prompt) is the instruction's, not an attempt:
# its words do not count. The gate removes the trivial optimum; it is no judge of content (five distinct
# made-up words pass).
_UNSPACED = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_ATTEMPT_WORD = re.compile(f"[{_UNSPACED}]|(?:(?![{_UNSPACED}])[^\\W\\d_]){{2,}}")
_CONSTRAINED_REPLY_WORDS = 4  # "My answer is yes/no/maybe." (detectable_format:constrained_response)


def distinct_words(text: str) -> int:
    """Distinct words (case-folded) that count towards an attempt; see the comment above. Combining marks
    (Devanagari's vowel signs, Thai's tone marks) are dropped first: `re` counts them as no letter, and
    would cut a Hindi word into pieces."""
    if text.isascii():  # the common case, several times faster
        return len({w.lower() for w in _ASCII_WORD.findall(text)})
    text = "".join(c for c in text if not unicodedata.category(c).startswith("M"))
    return len({w.casefold() for w in _ATTEMPT_WORD.findall(text)})


_ASCII_WORD = re.compile(r"[A-Za-z]{2,}")


def attempt_text(answer: str, instruction_ids: Sequence[str], kwargs_list: Sequence[Any]) -> str:
    """The answer less a repetition of the request that the row asks for first (as IFEval's repeat_prompt
    check finds it: the stripped answer starts with it, case-insensitively)."""
    for iid, kw in zip(instruction_ids, kwargs_list):
        request = kw.get("prompt_to_repeat") if isinstance(kw, Mapping) else None
        if iid == "combination:repeat_prompt" and isinstance(request, str) and request.strip():
            if answer.strip().lower().startswith(request.strip().lower()):
                return answer.strip()[len(request.strip()):]
    return answer


def attempt_minimum(instruction_ids: Sequence[str], kwargs_list: Sequence[Any], min_words: int) -> int:
    """The distinct words an answer needs to count as an attempt on this row: `min_words`, or fewer where
    the row's own instructions cap the answer's length below it."""
    need = min_words
    for iid, kw in zip(instruction_ids, kwargs_list):
        kw = kw if isinstance(kw, Mapping) else {}
        if iid == "length_constraints:number_words" and kw.get("relation") == "less than":
            need = min(need, max(1, (_as_count(kw.get("num_words")) - 1) // 2))
        elif iid == "detectable_format:constrained_response":
            need = min(need, _CONSTRAINED_REPLY_WORDS)
    return need


def _as_count(v: Any) -> int:
    """A row's word limit as an integer; a malformed one (the instruction reports it) lowers nothing."""
    try:
        return int(float(v))
    except (TypeError, ValueError, OverflowError):
        return 1 << 30
