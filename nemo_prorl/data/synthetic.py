"""Procedurally generated tasks with exact, verifiable answers: the embedded demo's data.

  reverse     "reverse 38274" -> "47283"
  sort        "sort 38274"    -> "23478"
  arithmetic  "37+48-5="      -> "80"

Every problem belongs to exactly one split, fixed by a hash of its text, so the supervised warm start,
the RL prompts and the validation prompts never share a problem. Each generator also returns what a
sloppy teacher would answer (see `model.warm_start.teacher_accuracy`)."""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, Iterator, NamedTuple

from nemo_prorl.config.schema import ProRLConfig, SyntheticTaskConfig
from nemo_prorl.data.formats import register_domain
from nemo_prorl.data.records import DATA_SOURCES, PromptRecord, PromptSource
from nemo_prorl.registry import Registry

# Out of 10 hash buckets: 0-5 warm start, 6-8 RL training, 9 validation.
SPLITS = {"warmstart": range(0, 6), "train": range(6, 9), "validation": range(9, 10)}


class Problem(NamedTuple):
    prompt: str
    answer: str
    sloppy_answer: str  # the warm-start teacher's typical mistake on this problem


TASKS: Registry[Callable[[random.Random, SyntheticTaskConfig], Problem]] = Registry("synthetic task")
TASK_REWARDS = {"reverse": "exact_match", "sort": "exact_match", "arithmetic": "arithmetic"}
for _task, _reward in TASK_REWARDS.items():  # so rows of these tasks can also come from files (format: records)
    register_domain(_task, _reward)


def _digits(rng: random.Random, task: SyntheticTaskConfig) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(task.min_digits, task.max_digits)))


@TASKS.register("reverse")
def reverse_task(rng: random.Random, task: SyntheticTaskConfig) -> Problem:
    s = _digits(rng, task)
    return Problem(f"reverse {s}", s[::-1], s)  # the sloppy teacher echoes the input


@TASKS.register("sort")
def sort_task(rng: random.Random, task: SyntheticTaskConfig) -> Problem:
    s = _digits(rng, task)
    return Problem(f"sort {s}", "".join(sorted(s)), s)


@TASKS.register("arithmetic")
def arithmetic_task(rng: random.Random, task: SyntheticTaskConfig) -> Problem:
    expr = str(rng.randint(0, task.max_value))
    for _ in range(rng.randint(task.min_operands, task.max_operands) - 1):
        expr += rng.choice(task.operators) + str(rng.randint(0, task.max_value))
    # Built here from digits and operators only, so eval sees no untrusted input.
    answer = int(eval(expr, {"__builtins__": {}}))  # noqa: S307
    return Problem(expr + "=", str(answer), str(answer + rng.choice((-10, -1, 1, 10))))


def split_of(prompt: str) -> str:
    bucket = int(hashlib.sha1(prompt.encode()).hexdigest(), 16) % 10
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def problems(task: SyntheticTaskConfig, seed: int, split: str, start: int = 0) -> Iterator[tuple[int, str, Problem]]:
    """Deterministic stream of (index, task name, problem) in `split`; `index` counts draws, so the stream
    resumes exactly from any index."""
    index = start
    while True:
        rng = random.Random(f"{seed}:{index}")
        name = rng.choice(task.tasks)
        prob = TASKS.get(name, "data.synthetic.tasks")(rng, task)
        if split_of(prob.prompt) == split:
            yield index, name, prob
        index += 1


def to_record(index: int, name: str, prob: Problem, split: str) -> PromptRecord:
    return PromptRecord(
        uid=f"{name}-{split}-{index}",
        messages=({"role": "user", "content": prob.prompt},),
        domain=name,
        reward=TASK_REWARDS[name],
        ground_truth=prob.answer,
        metadata={"split": split},
    )


class SyntheticSource(PromptSource):
    def __init__(self, task: SyntheticTaskConfig, seed: int, num_validation: int) -> None:
        self.task = task
        self.seed = seed
        self.num_validation = num_validation
        self.position = 0  # index of the next draw in the training stream

    def next_prompts(self, num: int) -> list[PromptRecord]:
        out: list[PromptRecord] = []
        stream = problems(self.task, self.seed, "train", self.position)
        while len(out) < num:
            index, name, prob = next(stream)
            out.append(to_record(index, name, prob, "train"))
            self.position = index + 1
        return out

    def validation_set(self) -> list[PromptRecord]:
        # Its own seed stream; the hash split alone already keeps it disjoint from the other splits.
        seen: set[str] = set()
        out: list[PromptRecord] = []
        stream = problems(self.task, self.seed + 1, "validation")
        while len(out) < self.num_validation:
            index, name, prob = next(stream)
            if prob.prompt not in seen:
                seen.add(prob.prompt)
                out.append(to_record(index, name, prob, "validation"))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


@DATA_SOURCES.register("synthetic")
def build_synthetic(cfg: ProRLConfig) -> PromptSource:
    return SyntheticSource(cfg.data.synthetic, cfg.data.seed, cfg.data.num_validation_prompts)
