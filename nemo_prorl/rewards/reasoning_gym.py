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

One scorer of reasoning-gym 0.1.25 is overridden because it can be gamed: game_of_life_halting compares
`bool(answer) == bool(oracle)`, so any non-empty answer scores 1 when the oracle is "True".
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any, Callable, Optional

from nemo_prorl.rewards.base import REWARDS, RewardInput, RewardResult, failed
from nemo_prorl.rewards.extract import last_tag, strip_thinking

_lock = threading.Lock()


@functools.lru_cache(maxsize=512)
def _dataset(task: str, config_json: str) -> Any:
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


def _strict_bool(answer: Optional[str], entry: dict) -> float:
    return float(isinstance(answer, str) and answer.strip().lower() == str(entry["answer"]).strip().lower())


# task -> scorer used instead of the package's (see the module docstring for why)
OVERRIDES: dict[str, Callable[[Optional[str], dict], float]] = {"game_of_life_halting": _strict_bool}


class ReasoningGymReward:
    def __init__(self, cfg: Any = None) -> None:
        pass

    def score(self, inp: RewardInput) -> RewardResult:
        meta = inp.metadata.get("reasoning_gym")
        if not isinstance(meta, dict):
            return failed("error", "metadata['reasoning_gym'] is missing (needs 'task' and 'entry_metadata')")
        entry_meta = meta.get("entry_metadata")
        if not isinstance(entry_meta, dict):
            return failed("error", "metadata['reasoning_gym']['entry_metadata'] is missing")
        task = meta.get("task") or entry_meta.get("source_dataset")
        if not task:
            return failed("error", "metadata['reasoning_gym']['task'] is missing")
        config = meta.get("config") or {}
        try:
            with _lock:  # building a dataset is not thread-safe in every task; scoring is quick
                ds = _dataset(task, json.dumps(config, sort_keys=True))
                if {"seed", "size"} <= set(config) and "source_index" in entry_meta:
                    entry = ds[int(entry_meta["source_index"])]
                else:
                    answer_ = meta["answer"] if "answer" in meta else (inp.ground_truth or None)
                    entry = {"question": inp.prompt, "answer": answer_, "metadata": entry_meta}
        except Exception as e:  # noqa: BLE001
            return failed("error", f"{type(e).__name__}: {e}")
        answer = last_tag(strip_thinking(inp.response), "answer")
        if answer is None:
            return RewardResult(0.0, correct=False, reason="no <answer> tag")
        try:
            value = float(OVERRIDES.get(task, ds.score_answer)(answer, entry))
        except Exception as e:  # noqa: BLE001
            # Several scorers raise on an answer they cannot parse (prime_factorization: int("abc")).
            # That is the model's malformed answer, so it scores 0 as a wrong answer; the exception is kept
            # in the reason and counted in `reward/<domain>/scorer_exception` in case it is a scorer bug.
            return RewardResult(0.0, correct=False, reason=f"{task}.score_answer raised {type(e).__name__}: {e}",
                                info={"scorer_exception": 1.0})
        if not 0.0 <= value <= 1.0:
            return failed("error", f"{task}.score_answer returned {value}, outside [0, 1]")
        return RewardResult(value, correct=value >= 1.0 - 1e-9, info={"scorer_exception": 0.0})


REWARDS.register("reasoning_gym")(ReasoningGymReward)
