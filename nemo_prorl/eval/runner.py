"""`prorl eval CHECKPOINT [CHECKPOINT ...] [OVERRIDES]`: pass@k of each checkpoint on the benchmarks of
`eval.tasks` (or the data source's validation set), sampled with the configured rollout engine and scored
with the reward registry; a table on the terminal, `eval.json`, and one PNG of every checkpoint's curves."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from transformers import AutoTokenizer

from nemo_prorl.config.schema import ProRLConfig, RewardConfig
from nemo_prorl.data import DATA_SOURCES
from nemo_prorl.data.blend import SourceStream
from nemo_prorl.data.readers import DataError
from nemo_prorl.data.records import PromptRecord
from nemo_prorl.data.templates import apply_chat_template_choice, encode_prompts
from nemo_prorl.trainer.evaluation import EvalResult, EvalTask, curve_ks, run_tasks, summarize, task_of
from nemo_prorl.eval.report import plot_pass_at_k, results_table
from nemo_prorl.policy.base import LazyWeight
from nemo_prorl.policy.megatron_convert import lazy_hf_weights
from nemo_prorl.rewards import RewardSuite
from nemo_prorl.rollout import ROLLOUT_ENGINES
from nemo_prorl.rollout.base import RolloutEngine, SamplingParams
from nemo_prorl.train import SHAPE_KEYS
from nemo_prorl.trainer.checkpoint import COMPLETE_MARKER, CheckpointError, list_checkpoints, verify_checkpoint
from nemo_prorl.weight_sync import load_into_engine

log = logging.getLogger(__name__)


class EvalError(ValueError):
    """Bad evaluation input (a file, a row, a task, a checkpoint); the message names it."""


def load_tasks(cfg: ProRLConfig) -> dict[str, list[PromptRecord]]:
    """The benchmarks' records by task name. Every row must be good: an evaluation that skipped rows would
    report a figure on a different benchmark, so a bad row stops it, naming the file and row."""
    if not cfg.eval.tasks:
        records = DATA_SOURCES.get(cfg.data.source, "data.source")(cfg).validation_set()
        if not records:
            raise EvalError(f"nothing to evaluate: eval.tasks is empty and data.source={cfg.data.source!r} has no "
                            "validation set (data.validation, data.num_validation_prompts); set eval.tasks or eval=prorl")
        out: dict[str, list[PromptRecord]] = {}
        for r in records:
            out.setdefault(task_of(r), []).append(r)
        return out
    data = dataclasses.replace(cfg.data, on_bad_row="error")
    out = {}
    for name, src in sorted(cfg.eval.tasks.items()):
        if not src.enabled:
            continue
        try:
            out[name] = SourceStream(name, src, data, cfg.data.seed + 1).head(src.max_samples)
        except DataError as e:
            raise EvalError(f"eval.tasks.{name}: {e}") from None
        except FileNotFoundError as e:
            raise EvalError(f"eval.tasks.{name}: no such file {e.filename or src.path!r}") from None
    if not out:
        raise EvalError("eval.tasks: every task is disabled")
    return out


def resolve_checkpoint(path: str) -> tuple[str, Path]:
    """(label, Hugging Face folder) for a run folder (its latest checkpoint), one of our checkpoints
    (verified), or a plain Hugging Face model folder."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise EvalError(f"checkpoint {path!r}: not a folder")
    if not (p / "config.json").is_file() and list_checkpoints(p / "checkpoints"):
        p = list_checkpoints(p / "checkpoints")[-1]
    if (p / "manifest.json").is_file() or p.name.startswith("step_"):
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            raise EvalError(str(e).replace("resume: ", "eval: ", 1)) from None
    if not (p / "config.json").is_file():
        raise EvalError(f"checkpoint {path!r}: no Hugging Face config.json (and no complete checkpoint under "
                        f"{p / 'checkpoints'} with a {COMPLETE_MARKER} marker)")
    label = f"{p.parent.parent.name}/{p.name}" if p.parent.name == "checkpoints" else p.name
    return label, p


def _encode(tokenizer: Any, tasks: dict[str, list[PromptRecord]], max_prompt_length: int) -> list[EvalTask]:
    out = []
    for name, records in tasks.items():
        kept, ids, dropped = encode_prompts(tokenizer, records, max_prompt_length)
        if dropped:
            log.warning("eval task %r: %d prompt(s) over data.max_prompt_length=%d tokens left out",
                        name, dropped, max_prompt_length)
        if kept:
            out.append(EvalTask(name, kept, ids, dropped))
    if not out:
        raise EvalError(f"every prompt is longer than data.max_prompt_length={max_prompt_length}")
    return out


class EngineCache:
    """One rollout engine for every checkpoint of the same model shape. The next checkpoint's weights are
    streamed into it through the trainer's weight-sync path, which spares vLLM's start-up (minutes on
    GPUs: CUDA graphs, compilation) per checkpoint; a checkpoint of another shape starts a new engine."""

    def __init__(self, cfg: ProRLConfig) -> None:
        # the engine sizes its context (vLLM's max_model_len) from the rollout's response length
        max_tokens = cfg.eval.max_response_length or cfg.rollout.max_response_length
        self.cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_response_length=max_tokens))
        self.engine: RolloutEngine | None = None
        self.shape: dict[str, Any] | None = None

    def load(self, model_dir: Path) -> tuple[RolloutEngine, str]:
        """The engine holding `model_dir`'s weights, and how they got there ("started" or "synced")."""
        config = json.loads((model_dir / "config.json").read_text())
        shape = {k: config.get(k) for k in SHAPE_KEYS}
        if self.engine is not None and shape == self.shape:
            names = lazy_hf_weights(model_dir)
            load_into_engine((LazyWeight(n, (names[n],)) for n in names), self.engine,
                             bucket_mb=self.cfg.rollout.weight_sync_bucket_mb)
            return self.engine, "synced"
        self.close()
        self.engine = ROLLOUT_ENGINES.get(self.cfg.rollout.engine, "rollout.engine")(self.cfg, model_dir)
        self.shape = shape
        return self.engine, "started"

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def evaluate_checkpoint(cfg: ProRLConfig, model_dir: Path, tasks: dict[str, list[PromptRecord]],
                        rewards: RewardSuite, engines: EngineCache,
                        samples_file: Path | None = None) -> dict[str, Any]:
    """Sample and score one checkpoint; its summary (see trainer/evaluation.summarize) plus timing."""
    e = cfg.eval
    tokenizer = apply_chat_template_choice(AutoTokenizer.from_pretrained(model_dir), cfg.data.prompt.chat_template)
    encoded = _encode(tokenizer, tasks, cfg.data.max_prompt_length)
    params = SamplingParams(n=e.num_samples_per_prompt, temperature=e.temperature, top_p=e.top_p,
                            max_tokens=engines.cfg.rollout.max_response_length,
                            stop_token_ids=(tokenizer.eos_token_id,), seed=e.seed, stop=tuple(cfg.rollout.stop))
    t0 = time.perf_counter()
    try:
        engine, how = engines.load(model_dir)
    except Exception as ex:  # safetensors, transformers and the engines raise many types for a damaged model
        engines.close()
        raise EvalError(f"checkpoint {model_dir}: its weights cannot be loaded ({type(ex).__name__}: {ex})") from ex
    load_s = time.perf_counter() - t0
    result = run_tasks(engine, tokenizer, rewards, encoded, params)
    if samples_file is not None:
        write_samples(samples_file, result, tokenizer)
    summary = summarize(result, curve_ks(e.num_samples_per_prompt, e.pass_k))
    summary.update(seconds=time.perf_counter() - t0, engine=how, engine_seconds=load_s,
                   generated_tokens=int(result.lengths.sum()))
    return summary


def evaluate_all(cfg: ProRLConfig, checkpoints: Sequence[str], out_dir: Path | None = None) -> dict[str, Any]:
    """Evaluate every checkpoint on the same prompts and samples' seed; write `eval.json` and
    `pass_at_k.png` to `out_dir` (eval.output_dir) and print the table."""
    if not checkpoints:
        raise EvalError("give at least one checkpoint: a run folder, a checkpoint or a Hugging Face model folder")
    resolved = [resolve_checkpoint(c) for c in checkpoints]  # every path checked before any sampling
    labels = _unique([label for label, _ in resolved])
    tasks = load_tasks(cfg)
    out_dir = Path(out_dir or cfg.eval.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    report = {"config": {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k != "tasks"} |
              {"tasks": sorted(tasks)}, "checkpoints": results}
    rewards, engines = RewardSuite(eval_reward_config(cfg.reward)), EngineCache(cfg)
    try:
        for label, (_, path) in zip(labels, resolved):
            log.info("evaluating %s (%s) on %d task(s)", label, path, len(tasks))
            samples = out_dir / "samples" / f"{label.replace('/', '_')}.jsonl" if cfg.eval.save_samples else None
            results[label] = {"path": str(path), **evaluate_checkpoint(cfg, path, tasks, rewards, engines, samples)}
            _write_json(out_dir / "eval.json", report)  # after each one: a later failure keeps these
    finally:
        engines.close()
        rewards.close()
    plot_pass_at_k(results, out_dir / "pass_at_k.png")
    print(results_table(results, cfg.eval.pass_k), flush=True)
    print(f"results: {out_dir / 'eval.json'}; pass@k curves: {out_dir / 'pass_at_k.png'}", flush=True)
    return report


def eval_reward_config(reward: RewardConfig) -> RewardConfig:
    """The reward settings `prorl eval` scores with: the run's, less the training-only gates, so that
    figures are the benchmarks' published semantics. IFEval's attempt gate (reward.ifeval.require_attempt)
    is off: upstream IFEval scores an answer that breaks no prohibition 1.0, however short."""
    return dataclasses.replace(reward, ifeval=dataclasses.replace(reward.ifeval, require_attempt=False))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)  # readers never see a half-written file


def write_samples(path: Path, result: EvalResult, tokenizer: Any) -> None:
    """One line per response: task, prompt uid, sample index, text, reward, correct, verifier status."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = result.num_samples
    with open(path, "w") as f:
        for i, ids in enumerate(result.token_ids):
            p, j = divmod(i, n)
            f.write(json.dumps({"task": result.tasks[p], "uid": result.records[p].uid, "sample": j,
                                "response": tokenizer.decode(ids, skip_special_tokens=True),
                                "reward": float(result.rewards[p, j]), "correct": bool(result.correct[p, j]),
                                "status": result.statuses[i]}) + "\n")


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out
