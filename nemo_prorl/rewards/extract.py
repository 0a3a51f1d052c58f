"""Pulling the answer out of a reasoning model's response: the text after the thinking block, the last
`\\boxed{}` (nested braces, `\\boxed {}`, `\\fbox`), `<answer>` tags, the last fenced code block.

These run on the policy's output in the trainer's threads, with no time limit, so each takes time linear
in the response: forward scans with `str.find`/`rfind`, one brace-matching pass, and regexes without
nested or overlapping quantifiers. (A search that restarts at every `\\boxed{`, `<answer>` or fence
opening and runs to the end of the text is quadratic: a response of such openings alone took hours.)
"""

from __future__ import annotations

import ast
import re
from typing import Optional

_THINK_END = "</think>"


def strip_thinking(response: str) -> str:
    """The part of a response after its last `</think>`; the whole response when there is none."""
    idx = response.rfind(_THINK_END)
    return response[idx + len(_THINK_END):] if idx >= 0 else response


BOXED_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
BOXED_BARE = re.compile(r"\\boxed ([^\s$]+)")  # `\boxed 5`
_BRACE = re.compile(r"(?<!\\)[{}]")  # a brace right after a backslash (`\{` in a set) does not nest


def matching_braces(text: str, pos: int = 0) -> dict[int, int]:
    """Position of each `{` at or after `pos` -> position of the `}` that closes it, for the braces that
    close. One pass with a stack; escaped braces (`\\{`, `\\}`) are skipped."""
    partner: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE.finditer(text, pos):
        p = m.start()
        if text[p] == "{":
            stack.append(p)
        elif stack:
            partner[stack.pop()] = p
    return partner


def last_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}`/`\\fbox{...}`, with nested braces balanced; None if absent
    or unterminated."""
    starts = [m.end() for m in BOXED_OPEN.finditer(text)]
    if starts:
        partner = matching_braces(text, starts[0] - 1)
        for start in reversed(starts):
            end = partner.get(start - 1)
            if end is not None:
                return text[start:end].strip()
    # `\boxed 5` (no braces) is accepted by graders too
    m = None
    for m in BOXED_BARE.finditer(text):
        pass
    return m.group(1) if m else None


def last_tag(text: str, tag: str) -> Optional[str]:
    """Content of the last `<tag>...</tag>`; None if absent. `tag` is a plain name. A closed pair is
    matched from its first opening to the first closing after it, as a lazy regex would."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    found = None
    pos = 0
    while (i := text.find(opening, pos)) >= 0:
        j = text.find(closing, i + len(opening))
        if j < 0:
            break  # no later opening has a closing either
        found = (i + len(opening), j)
        pos = j + len(closing)
    return text[found[0]:found[1]].strip() if found else None


_FENCE = "```"
_LANG = re.compile(r"[ \t]*([\w+#.-]*)")  # the language tag after a fence's backticks


def last_code_block(text: str, prefer: tuple[str, ...] = ("python", "py", "python3", "")) -> Optional[str]:
    """The last fenced code block whose language tag is in `prefer` (any block if none matches).

    A block opens at "```", whose line (the language tag first) ends at the next newline, and closes at
    the next "```" after that newline."""
    last = last_preferred = None
    pos = 0
    while (i := text.find(_FENCE, pos)) >= 0:
        newline = text.find("\n", i + len(_FENCE))
        if newline < 0:
            break
        end = text.find(_FENCE, newline + 1)
        if end < 0:
            break  # nor does any later opening close: their lines end at this newline too
        code = text[newline + 1:end]
        last = code
        if _LANG.match(text, i + len(_FENCE)).group(1).lower() in prefer:  # type: ignore[union-attr]
            last_preferred = code
        pos = end + len(_FENCE)
    return last_preferred if last_preferred is not None else last


# Several scorers evaluate the answer in the worker (sympy's parse_expr, eval). An answer that reaches Python
# beyond arithmetic (dunder attributes, builtins that run or find code, frames) can forge the worker's
# reply or read the expected value, which no check after the call can see (issue 18 review). No puzzle's
# answer needs these, so such an answer is refused before any scorer sees it.
_CODE = re.compile(
    r"__|\blambda\b"
    r"|\b(?:exec|eval|compile|getattr|setattr|delattr|hasattr|globals|locals|vars|open|breakpoint|sympify|parse_expr"
    r"|chr|bytes|bytearray|type|object|dir|input|memoryview|super|S|Function|Lambda|lambdify|import_module"
    r"|classmethod|staticmethod|property)\s*\("
    r"|\.\s*(?:f_locals|f_back|f_globals|gi_frame|cr_frame|tb_frame|mro|_getframe|modules|send_bytes)\b")


def code_like(answer: str) -> bool:
    return _CODE.search(answer) is not None


# Strict answer grammars for the scorers that evaluate an answer (an allowlist, where `code_like` is a
# blocklist kept for every answer as a second line). reasoning_gym.py maps each such task to one of them.
_LITERAL_NODES = (ast.Expression, ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.UnaryOp, ast.USub,
                  ast.UAdd, ast.Name, ast.Load)


def literal_or_text(answer: str) -> bool:
    """For scorers that `eval(answer)` as a fallback after an exact match (n_queens, spiral_matrix,
    binary_matrix, string_insertion): the answer is plain text (not Python, so eval fails as it would
    have) or a Python literal, where a bare name may only be capital letters (`EACADDDDB`, a right
    answer, parses as one; `oracle_answer` would read the scorer's own variable). Calls, attributes,
    subscripts, operators, f-strings, lambdas and comprehensions are refused, and so is an answer nested
    too deep for the parser: the trainer's stack is deeper than the worker's, so a depth that fails here
    could still compile there."""
    try:
        tree = ast.parse(answer.strip(), mode="eval")
    except SyntaxError:
        return True  # eval in the scorer fails the same way: nothing of the answer runs
    except (ValueError, RecursionError, MemoryError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _LITERAL_NODES) or (isinstance(node, ast.Name) and _CAPITALS.fullmatch(node.id) is None):
            return False
    return True


_CAPITALS = re.compile(r"[A-Z]+")


def arithmetic(answer: str) -> bool:
    """For countdown and puzzle24: the tasks' own operations and nothing else. Decimal integers, binary
    + - * /, parentheses, and a minus sign on an operand (the tasks' answers write a leading subtraction as
    `-5 + ...`). Refused: names and calls (`floor(E)` makes numbers it was not given), `**` and `//`
    (`10**3+2-1` is 1001, out of reach of 10, 3, 2, 1 with the four operations), `%`, bit operations (`-~x`
    is x + 1), a sign on a sign (`--x`: no arithmetic needs it, and its depth is unbounded), and an answer
    too deep for the parser. Characters first, so that only decimal digits make numbers (no `1e2`, `0x64`,
    `1_0`, `1.0`), then the syntax tree, which is what the scorers evaluate."""
    if _ARITHMETIC.fullmatch(answer) is None:
        return False
    try:
        tree = ast.parse(answer.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp):
            ok = type(node.op) in _ARITH_OPS
        elif isinstance(node, ast.UnaryOp):
            ok = isinstance(node.op, ast.USub) and not isinstance(node.operand, ast.UnaryOp)
        else:
            ok = isinstance(node, (ast.Expression, ast.Constant, ast.operator, ast.unaryop))
        if not ok:
            return False
    return True


_ARITHMETIC = re.compile(r"[0-9\s+\-*/()]+")
_ARITH_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)


# Function and constant names of the expressions that sympy-parsed answers hold (the oracle answers of
# polynomial_multiplication and the integration tasks use only these and one- or two-letter symbols).
# Not `Integral`: the integration scorers differentiate the answer, so restating the question as an
# unevaluated integral would score 1 (the oracles that are unevaluated integrals can then score no 1).
MATH_NAMES = frozenset({
    "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "acot", "asec", "acsc", "atan2", "sinh",
    "cosh", "tanh", "coth", "asinh", "acosh", "atanh", "exp", "log", "ln", "sqrt", "cbrt", "root", "pi", "oo",
    "Abs", "abs", "sign", "floor", "ceiling", "factorial", "gamma", "erf", "Rational"})
_EXPR_CHARS = re.compile(r"[0-9A-Za-z\s+\-*/^().,!=<>]*")
_NAME = re.compile(r"[A-Za-z]\w*")
_SYMBOL = re.compile(r"[A-Za-z]{1,2}[0-9]*")
# a dot that is not a decimal point: not followed by a digit, or a number running into a name (`1.5.n`)
_BARE_DOT = re.compile(r"\.(?![0-9])|\.[0-9]+(?![eE][-+0-9])[A-Za-z]")


def sympy_expression(answer: str) -> bool:
    """For scorers that hand the answer to sympy's `parse_expr` (which evals it): arithmetic with numbers,
    short symbols and `MATH_NAMES` only. No quotes, brackets, underscores or attribute dots, so no
    string reaches `S()`/`sympify`, no object's attributes are reached and no other function is named."""
    if _EXPR_CHARS.fullmatch(answer) is None or _BARE_DOT.search(answer):
        return False
    return all(m.group() in MATH_NAMES or _SYMBOL.fullmatch(m.group()) for m in _NAME.finditer(answer))
