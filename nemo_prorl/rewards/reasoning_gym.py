"""Logic puzzles (reward "reasoning_gym"), scored by the `reasoning-gym` package's own datasets: every task
it ships, each with its own `score_answer`, so rewards match the package's published scoring.

Row format (what a data loader writes into a PromptRecord):
    ground_truth = entry["answer"] ("" where the task has no single answer)     prompt = entry["question"]
    metadata["reasoning_gym"] = {"task": <dataset name; default: entry_metadata["source_dataset"]>,
                                 "config": {<dataset config kwargs used to generate, incl. seed and size>},
                                 "entry_metadata": entry["metadata"]}
When "config" has the seed and size, the entry is regenerated from (task, config, source_index): scorers
then see the exact Python types they produced (tuples, int keys), which a JSON round trip loses (arc_agi
and rearc then score a right answer 0.05). Otherwise the row's entry_metadata is used as is.

ProRL's prompts ask for the final answer in `<answer></answer>` tags: the last such tag after `</think>` is
scored. The reward is continuous in [0, 1] (many tasks give partial credit); `correct` means 1.

Scoring runs in `HardTimeoutPool` workers (confined: no environment secrets, no network): several scorers
hand the answer to sympy's parse_expr or eval (countdown, puzzle24, n_queens, ...), and some spin on an
adversarial answer (`x**99999999` to intermediate_integration); such a call is killed at
`reward.reasoning_gym.timeout_s` and recorded as a time out. Five tasks generate differently under another
PYTHONHASHSEED (isomorphic_strings, knight_swap, polynomial_multiplication, ransom_note, word_ladder), so a
regenerated entry is used only if its question matches the prompt; otherwise the row's metadata is.

Three scorers of reasoning-gym 0.1.25 are overridden because they can be gamed: game_of_life_halting
compares `bool(answer) == bool(oracle)`, so any non-empty answer scores 1 when the oracle is "True"; puzzle24
does not check that the answer uses the puzzle's numbers (`1*2*3*4` scored 1 on every puzzle); countdown
evaluates whatever sympy parses (`10**3+2-1` made 1001 from 10, 3, 2, 1) and compares floats within 1e-6.
Both arithmetic puzzles are scored exactly, from their own operations and numbers (`_arithmetic_value`).
"""

from __future__ import annotations

import ast
import copy
import functools
import json
from fractions import Fraction
from typing import Any, Callable, Optional, Sequence

from nemo_prorl.confine import GUARDED_OBJECTS, HardTimeoutPool
from nemo_prorl.rewards.base import REWARDS, RewardInput, RewardResult, failed
from nemo_prorl.rewards.extract import arithmetic, code_like, last_tag, literal_or_text, strip_thinking, sympy_expression


# The tasks whose scorer evaluates the answer (reasoning-gym 0.1.25: `eval` or sympy's `parse_expr` in
# score_answer) and the grammar an answer must follow to reach it; tests/test_rewards_reasoning_gym.py
# scans the installed package so that a new evaluating scorer fails CI until it is listed here.
ANSWER_GRAMMARS: dict[str, Callable[[str], bool]] = {
    "countdown": arithmetic, "puzzle24": arithmetic, "polynomial_multiplication": sympy_expression,
    "simple_integration": sympy_expression, "intermediate_integration": sympy_expression,
    "n_queens": literal_or_text, "spiral_matrix": literal_or_text, "binary_matrix": literal_or_text,
    "string_insertion": literal_or_text,
}


def grammar_refuses(tasks: Sequence[str], answer: str) -> Optional[str]:
    """The name of the grammar an answer breaks, for the first of `tasks` (the row's task and its source
    dataset) with one; None when it may be scored."""
    for task in tasks:
        check = ANSWER_GRAMMARS.get(task)
        if check is not None and not check(answer):
            return check.__name__
    return None


# The worker's datasets, built once per (task, config). A dict rather than a cache decorator: the worker's
# state guard checks each dataset object's attributes after every call (see _guarded_datasets).
_DATASETS: dict[tuple[str, str], Any] = {}
_MAX_DATASETS = 512


def _dataset(task: str, config_json: str) -> Any:
    ds = _DATASETS.get((task, config_json))
    if ds is None:
        ds = _build_dataset(task, config_json)
        if len(_DATASETS) >= _MAX_DATASETS:
            _DATASETS.pop(next(iter(_DATASETS)))
        _DATASETS[(task, config_json)] = ds
        _BUILT[0] += 1
    return ds


_BUILT = [0]  # datasets built so far: a new one is new state for the guard's snapshot


def _build_dataset(task: str, config_json: str) -> Any:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise KeyError(f"unknown reasoning-gym task {task!r}; reasoning_gym.factory.DATASETS lists the "
                       f"{len(DATASETS)} tasks of this version")
    config = json.loads(config_json)
    if not config:
        dataset_cls, config_cls = DATASETS[task]
        return dataset_cls(config=config_cls())  # as reasoning_gym.get_score_answer_fn builds it
    return reasoning_gym.create_dataset(task, **config)


def _guarded_datasets() -> list[tuple[str, Any]]:
    return [(f"reasoning_gym dataset {task}", ds) for (task, _), ds in _DATASETS.items()]


GUARDED_OBJECTS.append(_guarded_datasets)


@functools.lru_cache(maxsize=4096)  # the n samples of a prompt share one regenerated entry
def _entry(task: str, config_json: str, index: int) -> dict:
    return _dataset(task, config_json)[index]


def _strict_bool(answer: Optional[str], entry: dict) -> float:
    return float(isinstance(answer, str) and answer.strip().lower() == str(entry["answer"]).strip().lower())


def _arithmetic_value(answer: Optional[str], numbers: Sequence[int]) -> tuple[str, Optional[Fraction]]:
    """("ok", exact value) of an answer in the tasks' arithmetic (extract.arithmetic) that uses exactly
    `numbers`; ("malformed", None) or ("numbers", None) otherwise. The numbers are checked before anything is
    evaluated, so the work is bounded by the puzzle's own numbers; no eval, no floats."""
    if not isinstance(answer, str) or not answer.strip() or not arithmetic(answer):
        return "malformed", None
    tree = ast.parse(answer.strip(), mode="eval")
    used = sorted(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant))
    if used != sorted(int(n) for n in numbers):
        return "numbers", None
    try:
        return "ok", _exact(tree.body)
    except (ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return "malformed", None


def _puzzle24(answer: Optional[str], entry: dict) -> float:
    """puzzle24's scorer checks that the answer makes 24 with four numbers in range, not that they are the
    puzzle's four: `1*2*3*4` scored 1 on every puzzle. Here the numbers must be the puzzle's, and the
    arithmetic answer (its grammar) is evaluated exactly, without eval. 0.01 otherwise, as upstream."""
    kind, value = _arithmetic_value(answer, entry["metadata"]["numbers"])
    return 1.0 if kind == "ok" and value == 24 else 0.01


def _countdown(answer: Optional[str], entry: dict) -> float:
    """countdown's scorer parse_expr-evaluates the answer, so `**` and `//` reached targets the four
    operations cannot (`10**3+2-1` for 1001), and compares floats within 1e-6 (`100 + 1/9999999` made 100).
    As puzzle24: the task's operations only (the grammar), its numbers each used once, the value exact.
    Upstream's partial credit is kept: 0.01 for no expression, 0.05 for an expression with other numbers
    or another value (so breaking the rules earns no more than any wrong answer)."""
    kind, value = _arithmetic_value(answer, entry["metadata"]["numbers"])
    if kind == "malformed":
        return 0.01
    return 1.0 if kind == "ok" and value == entry["metadata"]["target"] else 0.05


_ARITH = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
          ast.Div: lambda a, b: a / b}


def _exact(node: ast.AST) -> Fraction:
    """The exact value of an arithmetic expression tree (integers, + - * /, signs); ValueError otherwise."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _exact(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        return _ARITH[type(node.op)](_exact(node.left), _exact(node.right))
    raise ValueError("not arithmetic")


# task -> scorer used instead of the package's (see the module docstring for why)
OVERRIDES: dict[str, Callable[[Optional[str], dict], float]] = {"game_of_life_halting": _strict_bool,
                                                                "puzzle24": _puzzle24, "countdown": _countdown}


def _regenerated(task: str, config_json: str, entry_meta: dict) -> Optional[dict]:
    config = json.loads(config_json)
    if {"seed", "size"} <= set(config) and "source_index" in entry_meta:
        return _entry(task, config_json, int(entry_meta["source_index"]))
    return None


def prepare_in_worker(arg: tuple[str, str, dict, str, Any, str]) -> bool:
    """Builds (and caches in the worker) the dataset and entry a job is scored against, before the clock of
    the call starts: the time limit is for the scorer on the model's answer, not for our data. The first
    time per task it also scores the oracle (trusted), so that the scorer's lazily built state exists
    before any answer runs. Returns whether it did new work."""
    task, config_json, entry_meta = arg[:3]
    before = (_BUILT[0], _entry.cache_info().misses)
    ds = _dataset(task, config_json)
    regen = _regenerated(task, config_json, entry_meta)
    fresh = (_BUILT[0], _entry.cache_info().misses) != before or task not in _WARMED
    if task not in _WARMED:
        _WARMED.add(task)
    if fresh:
        entry = copy.deepcopy(_entry_for(arg, ds, regen))
        try:
            _scorer(task, ds)(entry.get("answer"), entry)
        except Exception:  # noqa: BLE001  warming only
            pass
    return fresh  # new work done (from trusted data): the worker re-takes its state snapshot


_WARMED: set[str] = set()


def _entry_for(arg: tuple[str, str, dict, str, Any, str], ds: Any, regen: Optional[dict]) -> dict:
    _, _, entry_meta, prompt, oracle, _ = arg
    if regen is not None and prompt.startswith(regen["question"].rstrip()):
        return regen  # the exact types the scorer produced (JSON turned its tuples into lists)
    return {"question": prompt, "answer": oracle, "metadata": entry_meta}


def _scorer(task: str, ds: Any) -> Callable[[Optional[str], dict], float]:
    """The task's scorer, looked up on the dataset's class (an attribute set on the cached instance is not
    used), or our override."""
    if task in OVERRIDES:
        return OVERRIDES[task]
    return functools.partial(type(ds).score_answer, ds)


def score_in_worker(arg: tuple[str, str, dict, str, Any, str]) -> tuple[str, float, str]:
    """Worker entry point: (task, config json, entry metadata, prompt, oracle answer, model answer) ->
    ("ok", score, "") or ("exception", 0, what the scorer raised)."""
    task, config_json, entry_meta, prompt, oracle, answer = arg
    ds = _dataset(task, config_json)
    # a copy: some scorers change the entry they are given, which must not reach the cached one
    entry = copy.deepcopy(_entry_for(arg, ds, _regenerated(task, config_json, entry_meta)))
    try:
        score = float(_scorer(task, ds)(answer, entry))
    except Exception as e:  # noqa: BLE001
        return "exception", 0.0, f"{type(e).__name__}: {e}"
    return "ok", score, ""


class ReasoningGymReward:
    def __init__(self, cfg: Any = None) -> None:
        rg = getattr(cfg, "reasoning_gym", None)
        self.timeout_s = float(getattr(rg, "timeout_s", 10.0))
        self.pool = HardTimeoutPool(int(getattr(rg, "num_workers", 2)), preload=("reasoning_gym",))

    def score(self, inp: RewardInput) -> RewardResult:
        return self.score_batch([inp])[0]

    def _job(self, inp: RewardInput) -> tuple[Optional[tuple], Optional[RewardResult]]:
        meta = inp.metadata.get("reasoning_gym")
        if not isinstance(meta, dict):
            return None, failed("error", "metadata['reasoning_gym'] is missing (needs 'task' and 'entry_metadata')")
        entry_meta = meta.get("entry_metadata")
        if not isinstance(entry_meta, dict):
            return None, failed("error", "metadata['reasoning_gym']['entry_metadata'] is missing")
        task = meta.get("task") or entry_meta.get("source_dataset")
        if not task:
            return None, failed("error", "metadata['reasoning_gym']['task'] is missing")
        answer = last_tag(strip_thinking(inp.response), "answer")
        if answer is None:
            return None, RewardResult(0.0, correct=False, reason="no <answer> tag")
        broken = grammar_refuses((task, str(entry_meta.get("source_dataset", ""))), answer)
        if code_like(answer) or broken:
            why = f"the answer is not a {broken} answer" if broken else "the answer is Python code, not an answer"
            return None, RewardResult(0.0, correct=False, reason=why, info={"scorer_exception": 0.0, "tampered": 1.0})
        oracle = meta["answer"] if "answer" in meta else (inp.ground_truth or None)
        config_json = json.dumps(meta.get("config") or {}, sort_keys=True)
        return (task, config_json, entry_meta, inp.prompt, oracle, answer), None

    def score_batch(self, inputs: Sequence[RewardInput]) -> list[RewardResult]:
        out: list[Optional[RewardResult]] = []
        jobs, rows = [], []
        for i, inp in enumerate(inputs):
            job, res = self._job(inp)
            out.append(res)
            if job is not None:
                jobs.append(job)
                rows.append(i)
        for i, job, o in zip(rows, jobs, self.pool.map(score_in_worker, jobs, timeout=self.timeout_s,
                                                           prepare=prepare_in_worker)):
            out[i] = self._result(job[0], o)
        return out  # type: ignore[return-value]

    @staticmethod
    def _result(task: str, o: Any) -> RewardResult:
        if o.status == "tampered":  # the answer patched the scorer: hostile, scored as wrong
            return RewardResult(0.0, correct=False, reason=f"{task}: {o.reason}",
                                info={"scorer_exception": 0.0, "tampered": 1.0})
        if o.status != "ok":  # unknown task, a worker that died, or a time out
            return failed(o.status, o.reason)
        kind, value, why = o.value
        if kind == "tampered":
            return RewardResult(0.0, correct=False, reason=f"{task}: {why}", info={"scorer_exception": 0.0, "tampered": 1.0})
        if kind == "exception":
            # Several scorers raise on an answer they cannot parse (prime_factorization: int("abc")).
            # That is the model's malformed answer, so it scores 0 as a wrong answer; the exception is kept
            # in the reason and counted in `reward/<domain>/scorer_exception` in case it is a scorer bug.
            return RewardResult(0.0, correct=False, reason=f"{task}.score_answer raised {why}",
                                info={"scorer_exception": 1.0})
        if not 0.0 <= value <= 1.0:
            return failed("error", f"{task}.score_answer returned {value}, outside [0, 1]")
        return RewardResult(value, correct=value >= 1.0 - 1e-9, info={"scorer_exception": 0.0})

    def close(self) -> None:
        self.pool.close()


REWARDS.register("reasoning_gym")(ReasoningGymReward)
