"""Pulling the answer out of a reasoning model's response: the text after the thinking block, the last
`\\boxed{}` (nested braces, `\\boxed {}`, `\\fbox`), `<answer>` tags, the last fenced code block."""

from __future__ import annotations

import re
from typing import Optional

_THINK_END = "</think>"


def strip_thinking(response: str) -> str:
    """The part of a response after its last `</think>`; the whole response when there is none."""
    idx = response.rfind(_THINK_END)
    return response[idx + len(_THINK_END):] if idx >= 0 else response


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}`/`\\fbox{...}`, with nested braces balanced; None if absent
    or unterminated."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                i += 2  # an escaped brace (\{ in a set) does not nest
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
            i += 1
    # `\boxed 5` (no braces) is accepted by graders too
    m = list(re.finditer(r"\\boxed ([^\s$]+)", text))
    return m[-1].group(1) if m else None


def last_tag(text: str, tag: str) -> Optional[str]:
    """Content of the last `<tag>...</tag>`; None if absent."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)


def last_code_block(text: str, prefer: tuple[str, ...] = ("python", "py", "python3", "")) -> Optional[str]:
    """The last fenced code block whose language tag is in `prefer` (any block if none matches)."""
    blocks = _FENCE.findall(text)
    if not blocks:
        return None
    preferred = [code for lang, code in blocks if lang.lower() in prefer]
    return (preferred or [code for _, code in blocks])[-1]
