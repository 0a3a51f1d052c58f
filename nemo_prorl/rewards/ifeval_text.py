"""The text measures of the IFEval reward (ifeval.py): sentences, words as IFEval counts them, words as
nltk.word_tokenize keeps them for the case checks, and language detection. They follow google-research's
`instruction_following_eval/instructions_util.py` without its nltk data download (see ifeval.py for where
and why they differ)."""

from __future__ import annotations

import functools
import re
import threading
from typing import Any, Optional

_ALPHABETS = "([A-Za-z])"
_PREFIXES = "(Mr|St|Mrs|Ms|Dr)[.]"
_SUFFIXES = "(Inc|Ltd|Jr|Sr|Co)"
_STARTERS = (r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s"
             r"|That\s|This\s|Wherever)")
_ACRONYMS = "([A-Z][.][A-Z][.](?:[A-Z][.])?)"
_WEBSITES = "[.](com|net|org|io|gov|edu|me)"
_DIGITS = "([0-9])"
# Abbreviations whose period ends no sentence (beyond the reference's titles): `vs.`, `Prof.`, `Fig. 3`.
_ABBREVIATIONS = (r"\b(vs|etc|approx|cf|al|Prof|Mt|Ft|Fig|Figs|Eq|Eqs|Sec|Vol|Vols|Gen|Gov|Col|Sgt|Rev|Ave|Dept"
                  r"|Univ|Corp|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[.]")


def split_into_sentences(text: str) -> list[str]:
    """IFEval's regex sentence splitter (instructions_util.split_into_sentences): protects the periods
    of titles, acronyms, decimals and web addresses, then splits after `.`, `?` and `!`. Pieces with no
    word character (the second `!` of `!!`) are dropped so that counts match nltk's punkt more closely."""
    text = " " + text + "  "
    # the item markers of a numbered list ("1. ", "12. " at the start of a line) end no sentence
    text = re.sub(r"(^|\n)([ \t]*\d+)[.](?=\s)", "\\1\\2<prd>", text)  # [ \t]: linear on hostile text
    text = text.replace("\n", " ")
    text = re.sub(_PREFIXES, "\\1<prd>", text)
    text = re.sub(_ABBREVIATIONS, "\\1<prd>", text)
    text = re.sub(_WEBSITES, "<prd>\\1", text)
    text = re.sub(_DIGITS + "[.]" + _DIGITS, "\\1<prd>\\2", text)
    text = re.sub(r"\.{2,}", lambda m: "<prd>" * len(m.group(0)) + "<stop>", text)
    text = text.replace("Ph.D.", "Ph<prd>D<prd>")
    text = re.sub(r"\s" + _ALPHABETS + "[.] ", " \\1<prd> ", text)
    text = re.sub(_ACRONYMS + " " + _STARTERS, "\\1<stop> \\2", text)
    text = re.sub(_ALPHABETS + "[.]" + _ALPHABETS + "[.]" + _ALPHABETS + "[.]", "\\1<prd>\\2<prd>\\3<prd>", text)
    text = re.sub(_ALPHABETS + "[.]" + _ALPHABETS + "[.]", "\\1<prd>\\2<prd>", text)
    text = re.sub(" " + _SUFFIXES + "[.] " + _STARTERS, " \\1<stop> \\2", text)
    text = re.sub(" " + _SUFFIXES + "[.]", " \\1<prd>", text)
    text = re.sub(" " + _ALPHABETS + "[.]", " \\1<prd>", text)
    # a period inside a name (page.html, report.final.pdf, example.org/a.b): followed by a lower-case letter
    # or digit with no space; `sentence.This` (a missing space) still splits
    text = re.sub(r"(?<=\w)[.](?=[a-z0-9])", "<prd>", text)
    text = re.sub(r"[?](?=[\w.%-]+=)", "<qst>", text)  # a URL's query string
    text = text.replace(".\u201d", "\u201d.").replace('."', '".').replace('!"', '"!').replace('?"', '"?')
    for mark in ".?!":
        text = text.replace(mark, mark + "<stop>")
    text = text.replace("<prd>", ".").replace("<qst>", "?")
    return [s.strip() for s in text.split("<stop>") if re.search(r"\w", s)]


def count_words(text: str) -> int:
    """Words as IFEval counts them: runs of `\\w` characters (nltk's RegexpTokenizer(r"\\w+"))."""
    return len(re.findall(r"\w+", text))


_LANGDETECT_LOCK = threading.Lock()
_langdetect: Any = None  # the module once loaded; False when it cannot be imported


def langdetect_module() -> Any:
    """Import langdetect once, seeded so that detection is deterministic; None if unavailable."""
    global _langdetect
    with _LANGDETECT_LOCK:
        if _langdetect is None:
            try:
                import langdetect
                from langdetect import DetectorFactory, detector_factory

                DetectorFactory.seed = 0
                detector_factory.init_factory()  # load the profiles once, not racing in threads
                _langdetect = langdetect
            except Exception:  # noqa: BLE001  missing package or unreadable profiles: not checkable
                _langdetect = False
    return _langdetect or None


@functools.lru_cache(maxsize=256)
def detect_language(text: str) -> Optional[str]:
    """The detected ISO code; None when langdetect cannot tell (no letters), which IFEval counts as
    followed."""
    ld = langdetect_module()
    try:
        return ld.detect(text)
    except ld.LangDetectException:
        return None


# A word as nltk.word_tokenize keeps it: word characters joined by inner `-`, `'`, `/` or `.` (U.S.A.,
# Ph.D., I/O, ROCK'N'ROLL, VERY-GOOD), with the period of an abbreviation ...
_WORD = re.compile(r"\w+(?:[-'/.]\w+)*(?:(?<=\.\w)\.)?")
# ... and English contractions split off as their own token (DO + N'T, JOHN + 'S), as its Treebank rules do.
_CONTRACTION = re.compile(r"(?i)^(.+?)(n't|'s|'m|'d|'ll|'re|'ve)$")


def words_for_case(text: str) -> list[str]:
    """The words `change_case:capital_word_frequency` looks at, approximating nltk.word_tokenize."""
    out = []
    for w in _WORD.findall(text):
        m = _CONTRACTION.match(w)
        out.extend(m.groups() if m else (w,))
    return out
