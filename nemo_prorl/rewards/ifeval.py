"""IFEval-style instruction following as a reward (reward name "ifeval").

A row carries its instructions in `metadata` in the format of Google's IFEval data set:
`instruction_id_list` (ids such as "keywords:existence") and `kwargs` (one dict of arguments per id,
None values allowed and dropped). The checks follow `instruction_following_eval/instructions.py` of
google-research, so that rewards during training agree with the published IFEval scores, with these
differences:

* sentences are counted with the reference's own regex splitter (`split_into_sentences`, ifeval_text.py,
  pieces without a word character dropped) instead of nltk's punkt model, which needs a data download; like punkt, it
  does not end a sentence at a numbered list's item markers (`1.`), common abbreviations (`vs.`, `Prof.`,
  `Fig.`, `etc.`, `approx.`) or the periods inside file names and URLs (`report.final.pdf`);
* words for `change_case:capital_word_frequency` come from a regex that keeps what `nltk.word_tokenize`
  keeps whole (`U.S.A.`, `Ph.D.`, `I/O`, `ROCK'N'ROLL`) and splits contractions as it does (`DO` `N'T`);
* `keywords:letter_frequency` counts any single character (`#`, `!` occur in the data), and
  `keywords:forbidden_words` finds words that end in a symbol (`c++`, `C#`), which `\\b` cannot;
* keywords, markers and section splitters are matched literally (`re.escape`): the reference puts them
  into a regex unescaped, which only differs (or raises) for text with regex metacharacters;
* missing, unknown or ill-typed arguments are an error of the row; the reference draws random ones.

In training (`reward.ifeval.require_attempt`, on by default; `prorl eval` turns it off) an answer that does
not attempt the prompt scores 0: see `ifeval_attempt.py`. Upstream gives '.' 1.0 where every
instruction is a prohibition.

Only the text after the last `</think>` is checked. The reward is the fraction of instructions followed
strictly (continuous, so a partly compliant response still gets signal); `info` also has the "loose"
fraction (IFEval's loose variants: first/last line and `*` removed) and the all-followed rates.
Language checks need `langdetect`; without it those instructions are left out of the fraction and named
in the reason, rather than scored either way.
"""

from __future__ import annotations

import collections
import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from nemo_prorl.rewards.base import REWARDS, RewardInput, RewardResult, failed
from nemo_prorl.rewards.extract import strip_thinking
from nemo_prorl.rewards.ifeval_attempt import attempt_minimum, attempt_text, distinct_words
from nemo_prorl.rewards.ifeval_text import (count_words, detect_language, langdetect_module, split_into_sentences,
                                            words_for_case)


class InstructionError(ValueError):
    """An instruction the verifier cannot build: unknown id, or arguments that do not fit it."""


# ---------------------------------------------------------------------------------------------------
# Argument converters: each returns the cleaned value or raises ValueError/TypeError with a short why.

_RELATIONS = ("less than", "at least")


def _count(v: Any) -> int:
    """A non-negative integer (the data set stores some as floats, e.g. 3.0)."""
    if isinstance(v, bool):
        raise TypeError("expected an integer, got a bool")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if not isinstance(v, int):
        raise TypeError(f"expected an integer, got {type(v).__name__}")
    if v < 0:
        raise ValueError("must not be negative")
    return v


def _positive(v: Any) -> int:
    n = _count(v)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


def _text(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise TypeError("expected a non-empty string")
    return v


def _words(v: Any) -> list[str]:
    """A list of non-empty strings; a lone string counts as a list of one."""
    items = [v] if isinstance(v, str) else list(v)
    if not items or not all(isinstance(w, str) and w.strip() for w in items):
        raise TypeError("expected a non-empty list of non-empty strings")
    return items


def _relation(v: Any) -> str:
    if v not in _RELATIONS:
        raise ValueError(f"must be one of {_RELATIONS}")
    return v


def _letter(v: Any) -> str:
    """One character, counted literally (the public IFEval data has `#` and `!` as well as letters)."""
    c = v.strip() or v if isinstance(v, str) else v
    if not isinstance(c, str) or len(c) != 1:
        raise ValueError("expected a single character")
    return c.lower()


def _compare(actual: int, relation: str, threshold: int) -> bool:
    return actual < threshold if relation == "less than" else actual >= threshold


# ---------------------------------------------------------------------------------------------------
# Registry of instructions: id -> checker `(text, **arguments) -> bool` and its argument converters.


@dataclass(frozen=True)
class InstructionSpec:
    check: Callable[..., bool]
    params: Mapping[str, Callable[[Any], Any]]
    needs_langdetect: bool = False


INSTRUCTIONS: dict[str, InstructionSpec] = {}


def _instruction(iid: str, needs_langdetect: bool = False, **params: Callable[[Any], Any]):
    def deco(fn: Callable[..., bool]) -> Callable[..., bool]:
        INSTRUCTIONS[iid] = InstructionSpec(fn, params, needs_langdetect)
        return fn

    return deco


# --- keywords ---------------------------------------------------------------------------------------


@_instruction("keywords:existence", keywords=_words)
def keywords_existence(text: str, keywords: list[str]) -> bool:
    """Every keyword appears, case-insensitively, anywhere (substrings count, as in IFEval)."""
    return all(re.search(re.escape(k), text, flags=re.IGNORECASE) for k in keywords)


@_instruction("keywords:frequency", keyword=_text, frequency=_count, relation=_relation)
def keywords_frequency(text: str, keyword: str, frequency: int, relation: str) -> bool:
    """Case-insensitive occurrences of the keyword compared with `frequency`."""
    found = len(re.findall(re.escape(keyword.strip()), text, flags=re.IGNORECASE))
    return _compare(found, relation, frequency)


@_instruction("keywords:forbidden_words", forbidden_words=_words)
def keywords_forbidden_words(text: str, forbidden_words: list[str]) -> bool:
    """None of the words appears as a whole word (case-insensitive). Whole means no word character right
    before or after it, which also holds for words that end in a symbol (`c++`, `C#`), where `\\b` cannot."""
    return not any(re.search(r"(?<!\w)" + re.escape(w.strip()) + r"(?!\w)", text, flags=re.IGNORECASE)
                   for w in forbidden_words)


@_instruction("keywords:letter_frequency", letter=_letter, let_frequency=_count, let_relation=_relation)
def keywords_letter_frequency(text: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    """Occurrences of one character (a letter in either case) compared with `let_frequency`."""
    return _compare(collections.Counter(text.lower())[letter], let_relation, let_frequency)


# --- language and case ------------------------------------------------------------------------------


@_instruction("language:response_language", needs_langdetect=True, language=_text)
def response_language(text: str, language: str) -> bool:
    """The whole response is detected as `language` (ISO 639-1; "zh" also accepts "zh-cn"/"zh-tw")."""
    found = detect_language(text)
    return found is None or found == language or found.split("-")[0] == language


@_instruction("change_case:english_capital", needs_langdetect=True)
def english_capital(text: str) -> bool:
    """All letters upper case, and the text is English."""
    return text.isupper() and detect_language(text) in (None, "en")


@_instruction("change_case:english_lowercase", needs_langdetect=True)
def english_lowercase(text: str) -> bool:
    """All letters lower case, and the text is English."""
    return text.islower() and detect_language(text) in (None, "en")


@_instruction("change_case:capital_word_frequency", capital_frequency=_count, capital_relation=_relation)
def capital_word_frequency(text: str, capital_frequency: int, capital_relation: str) -> bool:
    """Words in all capitals (see `words_for_case`) compared with `capital_frequency`."""
    capitals = sum(1 for w in words_for_case(text) if w.isupper())
    return _compare(capitals, capital_relation, capital_frequency)


# --- length -----------------------------------------------------------------------------------------


@_instruction("length_constraints:number_sentences", num_sentences=_count, relation=_relation)
def number_sentences(text: str, num_sentences: int, relation: str) -> bool:
    return _compare(len(split_into_sentences(text)), relation, num_sentences)


@_instruction("length_constraints:number_words", num_words=_count, relation=_relation)
def number_words(text: str, num_words: int, relation: str) -> bool:
    return _compare(count_words(text), relation, num_words)


@_instruction("length_constraints:number_paragraphs", num_paragraphs=_count)
def number_paragraphs(text: str, num_paragraphs: int) -> bool:
    """Exactly `num_paragraphs` paragraphs separated by the markdown divider `***`; an empty paragraph
    between two dividers fails, empty ones at either end are ignored."""
    paragraphs = re.split(r"\s?\*\*\*\s?", text)
    count = len(paragraphs)
    for i, p in enumerate(paragraphs):
        if not p.strip():
            if i in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == num_paragraphs


@_instruction("length_constraints:nth_paragraph_first_word", num_paragraphs=_count, nth_paragraph=_positive,
              first_word=_text)
def nth_paragraph_first_word(text: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly `num_paragraphs` paragraphs separated by blank lines (`\\n\\n`), and paragraph
    `nth_paragraph` (from 1) starts with `first_word`, ignoring case, quotes and trailing punctuation."""
    paragraphs = re.split(r"\n\n", text)
    count = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > count:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()  # indexes the raw split, as the reference does
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        first += ch.lower()
    return count == num_paragraphs and first == first_word.lower()


# --- detectable content and format ------------------------------------------------------------------


_PLACEHOLDER = re.compile(r"\[[^\]\n]*(\])?")  # "[" and the rest of its line; group 1: the "]" closing it


@_instruction("detectable_content:number_placeholders", num_placeholders=_count)
def number_placeholders(text: str, num_placeholders: int) -> bool:
    """At least `num_placeholders` square-bracket placeholders such as [address]."""
    # `\[.*?\]` restarts at every `[` and scans to the end of its line: quadratic on "[[[[...". A failed
    # `[` here takes up the rest of its line (no `[` in it could close either), and only closed ones count.
    return sum(1 for m in _PLACEHOLDER.finditer(text) if m.group(1)) >= num_placeholders


@_instruction("detectable_content:postscript", postscript_marker=_text)
def postscript(text: str, postscript_marker: str) -> bool:
    """A line starting with the marker; "P.S." and "P.P.S" also match with spaces and in any case."""
    marker = postscript_marker.strip()
    # The reference's `\s*<marker>.*$` (multi-line) matches wherever the marker does: its `\s*` may be
    # empty and `.*$` always matches. So search for the marker alone; the leading `\s*` restarted at every
    # space of a run of spaces and ran to its end, quadratic.
    if marker == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif marker == "P.S.":
        pattern = r"p\.\s?s\."
    else:
        pattern = re.escape(marker.lower())
    return re.search(pattern, text.lower()) is not None


@_instruction("detectable_format:number_bullet_lists", num_bullets=_count)
def number_bullet_lists(text: str, num_bullets: int) -> bool:
    """Exactly `num_bullets` markdown bullet lines (`* item` or `- item`)."""
    return _line_items(text, "*") + _line_items(text, "-") == num_bullets


_NON_SPACE = re.compile(r"\S")


def _line_items(text: str, bullet: str) -> int:
    r"""How many matches the reference's multi-line `^\s*\*[^\*].*$` (bullet "*") or `^\s*-.*$` (bullet
    "-") has, in linear time. Its `\s*` crosses line ends, so every line start of a run of blank lines
    scanned the whole run: quadratic. Here all those line starts share one first non-space character, so
    one look at it settles them all. (As in the reference, `*` followed by a line end takes in the next
    line, and a match may start on a blank line above its bullet.)"""
    count, pos, n = 0, 0, len(text)
    while (first := _NON_SPACE.search(text, pos)) is not None:
        f = first.start()
        line_end = f
        if text[f] == bullet and (bullet != "*" or (f + 1 < n and text[f + 1] != "*")):
            count += 1
            line_end = f + 2 if bullet == "*" else f + 1  # `[^\*]` takes the character after a `*`, even "\n"
        nl = text.find("\n", line_end)
        if nl < 0:
            break
        pos = nl + 1
    return count


_CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@_instruction("detectable_format:constrained_response")
def constrained_response(text: str) -> bool:
    """One of IFEval's fixed answers ("My answer is yes." ...) appears in the response."""
    return any(option in text.strip() for option in _CONSTRAINED_OPTIONS)


@_instruction("detectable_format:number_highlighted_sections", num_highlights=_count)
def number_highlighted_sections(text: str, num_highlights: int) -> bool:
    """At least `num_highlights` non-empty `*highlighted*` or `**highlighted**` spans on one line."""
    found = sum(1 for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip())
    found += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h[2:-2].strip())
    return found >= num_highlights


@_instruction("detectable_format:multiple_sections", section_spliter=_text, num_sections=_count)
def multiple_sections(text: str, num_sections: int, section_spliter: str) -> bool:
    """At least `num_sections` section headers "<spliter> <number>" (e.g. "SECTION 1")."""
    pattern = r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?"
    return len(re.split(pattern, text)) - 1 >= num_sections


@_instruction("detectable_format:json_format")
def json_format(text: str) -> bool:
    """The whole response parses as JSON, optionally inside a ```json fence."""
    value = text.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        value = value.removeprefix(prefix)
    value = value.removesuffix("```").strip()
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


@_instruction("detectable_format:title")
def title(text: str) -> bool:
    """A non-empty title in double angular brackets, such as <<poem of joy>>."""
    # The reference's `<<[^\n]+>>` matches, on each line, from its first "<<" to its last ">>" (at least one
    # character between); tried at every "<<" of a line with no ">>", it was quadratic.
    for line in text.split("\n"):
        start, end = line.find("<<"), line.rfind(">>")
        if start >= 0 and end >= start + 3 and line[start:end + 2].lstrip("<").rstrip(">").strip():
            return True
    return False


# --- combination, start/end, punctuation ------------------------------------------------------------


@_instruction("combination:two_responses")
def two_responses(text: str) -> bool:
    """Exactly two different responses separated by `******` (empty parts only at the ends)."""
    valid = []
    parts = text.split("******")
    for i, part in enumerate(parts):
        if not part.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(part)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


@_instruction("combination:repeat_prompt", prompt_to_repeat=_text)
def repeat_prompt(text: str, prompt_to_repeat: str) -> bool:
    """The response starts by repeating the request word for word (case-insensitive)."""
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


@_instruction("startend:end_checker", end_phrase=_text)
def end_checker(text: str, end_phrase: str) -> bool:
    """The response ends with the phrase (case-insensitive, surrounding quotes ignored)."""
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@_instruction("startend:quotation")
def quotation(text: str) -> bool:
    """The whole response is wrapped in double quotation marks."""
    value = text.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


@_instruction("punctuation:no_comma")
def no_comma(text: str) -> bool:
    return "," not in text


# ---------------------------------------------------------------------------------------------------
# Building and evaluating a row's instructions.


@dataclass(frozen=True)
class Outcome:
    """One instruction's verdict; `strict`/`loose` are None when it could not be checked (`note` says
    why)."""

    instruction_id: str
    strict: Optional[bool]
    loose: Optional[bool]
    note: str = ""


def build_check(instruction_id: str, kwargs: Optional[Mapping[str, Any]]) -> Callable[[str], bool]:
    """The instruction's checker bound to its arguments. None values are dropped (the data set pads
    every row with all argument names); unknown, missing or ill-typed ones raise InstructionError."""
    spec = INSTRUCTIONS.get(instruction_id)
    if spec is None:
        raise InstructionError(f"unknown instruction id {instruction_id!r}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise InstructionError(f"{instruction_id}: kwargs must be a dict, got {type(kwargs).__name__}")
    given = {k: v for k, v in (kwargs or {}).items() if v is not None}
    unknown = sorted(set(given) - set(spec.params))
    if unknown:
        raise InstructionError(f"{instruction_id}: unexpected kwarg(s) {', '.join(unknown)}; "
                               f"expected {sorted(spec.params) or 'none'}")
    missing = sorted(set(spec.params) - set(given))
    if missing:
        raise InstructionError(f"{instruction_id}: missing kwarg(s) {', '.join(missing)}")
    bound = {}
    for key, convert in spec.params.items():
        try:
            bound[key] = convert(given[key])
        except (TypeError, ValueError) as e:
            raise InstructionError(f"{instruction_id}: bad kwarg {key}={given[key]!r}: {e}") from None
    return functools.partial(spec.check, **bound)


def loose_variants(text: str) -> list[str]:
    """IFEval's loose responses: the text, without its first line, without its last, without both,
    and each of those with `*` removed (markdown emphasis that trips format checks)."""
    lines = text.split("\n")
    base = [text, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return list(dict.fromkeys(base + [v.replace("*", "") for v in base]))


def _follows(check: Callable[[str], bool], text: str) -> bool:
    return bool(text.strip()) and bool(check(text))  # an empty response follows nothing


def evaluate(text: str, instruction_ids: Sequence[str], kwargs_list: Sequence[Any]) -> list[Outcome]:
    """Strict and loose verdicts for each instruction on `text` (the answer, thinking removed).
    Raises InstructionError for a malformed instruction list, before checking anything."""
    if len(kwargs_list) != len(instruction_ids):
        raise InstructionError(f"{len(instruction_ids)} instruction ids but {len(kwargs_list)} kwargs entries")
    checks = [build_check(iid, kw) for iid, kw in zip(instruction_ids, kwargs_list)]
    outcomes = []
    for iid, check in zip(instruction_ids, checks):
        if INSTRUCTIONS[iid].needs_langdetect and langdetect_module() is None:
            outcomes.append(Outcome(iid, None, None, "langdetect is not installed"))
            continue
        try:
            strict = _follows(check, text)
            loose = strict or any(_follows(check, v) for v in loose_variants(text)[1:])
        except Exception as e:  # noqa: BLE001  a checker bug is reported against its instruction
            raise InstructionError(f"{iid}: check failed with {type(e).__name__}: {e}") from e
        outcomes.append(Outcome(iid, strict, loose))
    return outcomes


def _instructions_of(metadata: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
    """(ids, kwargs) from a row's metadata; kwargs may be absent (all instructions argument-free) or a
    JSON string, as some IFEval-derived data sets store it."""
    ids = metadata.get("instruction_id_list")
    if ids is None or isinstance(ids, str):
        raise InstructionError("metadata has no instruction_id_list (a list of IFEval instruction ids)")
    ids = list(ids)
    if not ids:
        raise InstructionError("metadata instruction_id_list is empty: nothing to check")
    kwargs = metadata.get("kwargs")
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except ValueError as e:
            raise InstructionError(f"metadata kwargs is not valid JSON: {e}") from None
    return ids, [{}] * len(ids) if kwargs is None else list(kwargs)


class IFEvalReward:
    """Fraction of a row's IFEval instructions the answer follows strictly; `correct` when all are.

    With `reward.ifeval.require_attempt` (the default, for training) an answer that does not attempt the
    prompt (fewer distinct words than `attempt_minimum`) scores 0 whatever it follows: its reason says so
    and `info["no_attempt"]` is 1 (0 on every other row, so the trainer logs the gated fraction). `prorl
    eval` turns the gate off: upstream IFEval's semantics, with no `no_attempt` key."""

    def __init__(self, cfg: Any = None) -> None:
        icfg = getattr(cfg, "ifeval", None)
        self.require_attempt = bool(getattr(icfg, "require_attempt", True))
        self.min_distinct_words = int(getattr(icfg, "min_distinct_words", 5))

    def score(self, inp: RewardInput) -> RewardResult:
        try:
            ids, kwargs = _instructions_of(inp.metadata or {})
            answer = strip_thinking(inp.response)
            outcomes = evaluate(answer, ids, kwargs)
        except InstructionError as e:
            return failed("error", str(e))
        checked = [o for o in outcomes if o.strict is not None]
        unchecked = [f"{o.instruction_id} ({o.note})" for o in outcomes if o.strict is None]
        if not checked:
            return failed("error", "no instruction could be checked: " + "; ".join(unchecked))
        strict = sum(bool(o.strict) for o in checked) / len(checked)
        loose = sum(bool(o.loose) for o in checked) / len(checked)
        reasons = []
        missed = [o.instruction_id for o in checked if not o.strict]
        if missed:
            reasons.append("not followed: " + ", ".join(missed))
        if unchecked:
            reasons.append("not checkable: " + "; ".join(unchecked))
        info = {"strict": strict, "loose": loose,
                "strict_all": float(strict == 1.0), "loose_all": float(loose == 1.0)}
        if self.require_attempt:
            have = distinct_words(attempt_text(answer, ids, kwargs))
            need = attempt_minimum(ids, kwargs, self.min_distinct_words)
            info["no_attempt"] = float(have < need)
            if have < need:  # the instructions' figures stay in `info`: what upstream IFEval would give
                why = (f"no attempt: {have} distinct word(s), the training gate (reward.ifeval.require_attempt) "
                       f"asks for {need}")
                return RewardResult(0.0, correct=False, reason="; ".join([why, *reasons]), info=info)
        return RewardResult(strict, correct=strict == 1.0, reason="; ".join(reasons), info=info)


REWARDS.register("ifeval")(IFEvalReward)
