"""Prolonged-run operations (issue 27, items 5-10): a step whose DAPO rounds fall short plans its updates
evenly, a non-finite reward is a verifier error, a rollback sets the abandoned timeline aside instead of
pruning the new checkpoint, a torn log line and an interrupted checkpoint write do not stop or litter a
resume, and what the docs say of stage resets and a second SIGTERM is what the code does."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from nemo_prorl.algo.sampling import minibatch_sizes
from nemo_prorl.config import load_config
from nemo_prorl.config.loader import ConfigError
from nemo_prorl.data import synthetic
from nemo_prorl.rewards import REWARDS, RewardInput, RewardResult, RewardSuite
from nemo_prorl.train import run_training
from nemo_prorl.trainer.batching import minibatch_plan
from nemo_prorl.trainer.checkpoint import _prune, list_checkpoints
from nemo_prorl.trainer.logger import LogFileError, read_jsonl, truncate_logs
from tests.checks import assert_every_step_updated
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def _args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, f"model.path={model_dir}", f"trainer.output_dir={out}", "trainer.plot=false",
            "trainer.tensorboard=false", "validation.every_n_steps=0", *extra]


# ---------------------------------------------------------------- 5. a short step's updates
@pytest.mark.parametrize("groups,per_mb,sizes", [
    (256, 64, [64, 64, 64, 64]),  # a full ProRL step: four updates of 64, as planned
    (130, 64, [65, 65]),  # was [64, 64, 2]: two groups moved the policy as much as 64
    (65, 64, [65]),  # was [64, 1]
    (1, 64, [1]),
    (96, 64, [48, 48]),
    (95, 64, [95]),
    (160, 64, [54, 53, 53]),
    (3, 2, [2, 1]),
    (0, 64, []),
])
def test_minibatch_sizes_spread_the_kept_groups(groups, per_mb, sizes):
    assert minibatch_sizes(groups, per_mb) == sizes


def test_minibatch_sizes_keep_every_update_near_the_planned_size():
    for per_mb in (1, 2, 7, 16, 64):
        for groups in range(per_mb, 6 * per_mb):
            sizes = minibatch_sizes(groups, per_mb)
            assert sum(sizes) == groups and max(sizes) - min(sizes) <= 1
            mean = groups / len(sizes)
            assert 0.75 * per_mb <= mean < 1.5 * per_mb, (groups, per_mb, sizes)


def test_minibatch_plan_of_a_full_step_is_unchanged():
    """A step that got all its groups is planned exactly as before (consecutive slices of one shuffle per
    epoch): resumes of older runs and every golden figure stay bit-identical."""
    n, per_mb = 4, 3
    for epochs in (1, 2):
        got = minibatch_plan(12, n, per_mb, epochs, torch.Generator().manual_seed(5))
        gen, want = torch.Generator().manual_seed(5), []
        for _ in range(epochs):
            order = torch.randperm(12, generator=gen)
            want += [(order[s:s + per_mb].unsqueeze(1) * n + torch.arange(n)).flatten() for s in range(0, 12, per_mb)]
        assert len(got) == len(want) == 4 * epochs
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    short = minibatch_plan(5, n, per_mb, 1, torch.Generator().manual_seed(5))
    assert [len(rows) // n for rows in short] == [3, 2]
    assert sorted(torch.cat(short).tolist()) == list(range(5 * n))  # every row once, whole groups


def test_a_minibatch_that_does_not_divide_the_step_is_refused():
    with pytest.raises(ConfigError, match=r"algo.num_prompts_per_minibatch=3: must divide algo.num_prompts_per_step=8"):
        load_config(["algo.num_prompts_per_step=8", "algo.num_prompts_per_minibatch=3"])
    load_config(["algo.num_prompts_per_step=8", "algo.num_prompts_per_minibatch=4"])


class ReverseUniform:
    """Reverse prompts: the same reward for every response (a group without signal). Sort prompts: reward
    by the response's length, which the untrained tiny model varies."""

    def score(self, inp):
        if "reverse" in inp.prompt.lower():
            return RewardResult(1.0, correct=True)
        return RewardResult(float(len(inp.response) % 3) / 2, correct=False)


class NanForReverse:
    """A broken verifier: NaN for reverse prompts, a varied reward for the others."""

    def score(self, inp):
        if "reverse" in inp.prompt.lower():
            return RewardResult(float("nan"), correct=False)
        return RewardResult(float(len(inp.response) % 2), correct=False)


def _use_reward(monkeypatch, name, factory):
    if name not in REWARDS:
        REWARDS.register(name)(lambda cfg=None: factory())
    for task in ("reverse", "sort"):
        monkeypatch.setitem(synthetic.TASK_REWARDS, task, name)


def test_a_short_step_spreads_its_groups_and_logs_the_shortfall(tiny_model_dir, tmp_path, monkeypatch):
    _use_reward(monkeypatch, "test_reverse_uniform", ReverseUniform)
    cfg, resolved = load_config(_args(tiny_model_dir, tmp_path, "trainer.num_steps=2", "reward.overlong.enabled=false",
                                      "algo.num_prompts_per_step=8", "algo.num_prompts_per_minibatch=4",
                                      "algo.dynamic_sampling.max_generation_rounds=1"))
    run_training(cfg, resolved)
    rows = [r for r in _rows(tmp_path / "metrics.jsonl") if "filter/kept_groups" in r]
    assert len(rows) == 2
    short = [r for r in rows if 0 < r["filter/kept_groups"] < 8]
    assert short, f"the test's data gave no partly uniform step: {[r['filter/kept_groups'] for r in rows]}"
    for r in rows:
        kept = int(r["filter/kept_groups"])
        assert r["filter/shortfall_groups"] == 8 - kept
        assert r["actor/num_updates"] == len(minibatch_sizes(kept, 4))
    assert_every_step_updated(short)
    events = [e for e in _rows(tmp_path / "events.jsonl") if e["event"] == "groups_short"]
    assert [(e["step"], e["kept"], e["planned"]) for e in events] == [
        (r["step"], int(r["filter/kept_groups"]), 8) for r in rows if r["filter/shortfall_groups"] > 0]


# ---------------------------------------------------------------- 6. non-finite rewards
class _Fixed:
    def __init__(self, value, info=None):
        self.value, self.info = value, info or {}

    def score(self, inp):
        return RewardResult(self.value, correct=False, info=self.info)


class _FixedBatch(_Fixed):
    def score_batch(self, inputs):
        return [self.score(i) for i in inputs]


@pytest.mark.parametrize("value,info", [(float("nan"), {}), (float("inf"), {}), (-float("inf"), {}), ("1", {}),
                                        (None, {}), (1.0, {"loose": float("nan")})])
@pytest.mark.parametrize("kind", [_Fixed, _FixedBatch])
def test_a_non_finite_reward_is_a_verifier_error(value, info, kind):
    name = f"test_fixed_{kind.__name__}"
    suite = RewardSuite()
    suite._fns[name] = kind(value, info)  # one suite, one instance: the registry is not needed here
    inp = RewardInput(response="x", ground_truth="1")
    for res in (suite.score(name, inp), suite.score_batch([name, name], [inp, inp])[1]):
        assert res.status == "error" and res.reward == 0.0 and not res.correct
        assert "non-finite or non-numeric" in res.reason and name in res.reason
    ok = RewardSuite()
    ok._fns[name] = kind(0.5, {"loose": 1.0})
    assert ok.score(name, inp) == RewardResult(0.5, correct=False, info={"loose": 1.0})
    suite.close()
    ok.close()


def test_a_nan_reward_is_counted_and_named_in_a_run(tiny_model_dir, tmp_path, monkeypatch):
    """With DAPO a NaN group used to be dropped as 'uniform' without a word (NaN > atol is False)."""
    _use_reward(monkeypatch, "test_nan_for_reverse", NanForReverse)
    cfg, resolved = load_config(_args(tiny_model_dir, tmp_path, "trainer.num_steps=1", "reward.overlong.enabled=false",
                                      "algo.dynamic_sampling.max_generation_rounds=1"))
    run_training(cfg, resolved)
    (row,) = [r for r in _rows(tmp_path / "metrics.jsonl") if "reward/error_frac" in r]
    assert 0.0 < row["reward/error_frac"] < 1.0
    assert all(math.isfinite(v) for v in row.values()), row
    (event,) = [e for e in _rows(tmp_path / "events.jsonl") if e["event"] == "reward_failures"]
    assert "reward=nan" in event["examples"][0]


# ---------------------------------------------------------------- 7-9. rollback, torn logs, partial writes
@pytest.fixture(scope="module")
def six_steps(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 2, 4 and 6; tests work on copies."""
    out = tmp_path_factory.mktemp("six") / "run"
    cfg, resolved = load_config(_args(tiny_model_dir, out, "trainer.num_steps=6", "trainer.checkpoint_every_n_steps=2",
                                      "trainer.keep_last_checkpoints=10"))
    run_training(cfg, resolved)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_000002", "step_000004", "step_000006"]
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_a_rollback_sets_the_newer_checkpoints_aside_and_keeps_the_new_one(tiny_model_dir, six_steps, tmp_path):
    run = _copy(six_steps, tmp_path)
    ckpts = run / "checkpoints"
    cfg, resolved = load_config(_args(tiny_model_dir, run, f"resume={ckpts / 'step_000004'}", "trainer.num_steps=5",
                                      "trainer.keep_last_checkpoints=1", "trainer.checkpoint_every_n_steps=1"))
    run_training(cfg, resolved)
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_000005"]  # was: step_6 kept, step_5 pruned
    (aside,) = (ckpts / "abandoned").iterdir()
    assert aside.name.endswith("after-step_000004") and [p.name for p in aside.iterdir() if p.is_dir()] == [
        "step_000006"]
    assert (aside / "step_000006" / "COMPLETE").is_file()
    # the abandoned timeline's log rows went with it; the run's log is the new timeline's
    assert sorted({r["step"] for r in _rows(aside / "metrics.jsonl")}) == [5, 6]
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    (event,) = [e for e in _rows(run / "events.jsonl") if e["event"] == "resume_cleanup"]
    assert event["abandoned_checkpoints"] == ["step_000006"] and event["moved_to"] == str(aside)
    # a later resume=auto continues the new timeline
    cfg, resolved = load_config(_args(tiny_model_dir, run, "resume=auto", "trainer.num_steps=6",
                                      "trainer.keep_last_checkpoints=1"))
    run_training(cfg, resolved)
    assert [r["step"] for r in _rows(run / "events.jsonl") if r["event"] == "resumed"] == [4, 5]


def test_prune_never_removes_the_checkpoint_just_written(tmp_path):
    for step in (4, 6, 5):
        (tmp_path / f"step_{step:06d}").mkdir()
        (tmp_path / f"step_{step:06d}" / "COMPLETE").write_text(str(step))
    _prune(tmp_path, keep_last=1, keep_best_metric=None, just_written=tmp_path / "step_000005")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000005", "step_000006"]


def test_resume_drops_a_torn_line_and_removes_interrupted_checkpoint_writes(tiny_model_dir, six_steps, tmp_path,
                                                                           caplog):
    run = _copy(six_steps, tmp_path)
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "step_000006")  # killed during step 6's checkpoint write: a partial folder
    partial = ckpts / ".tmp-step_000006-999999"
    shutil.copytree(ckpts / "step_000004", partial)
    (partial / "COMPLETE").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward/mean": 0.2')  # killed mid-write
    with open(run / "events.jsonl", "a") as f:
        f.write('{"step": 6, "ev')
    before = _rows(six_steps / "metrics.jsonl")
    cfg, resolved = load_config(_args(tiny_model_dir, run, "resume=auto", "trainer.num_steps=6"))
    with caplog.at_level("WARNING", logger="nemo_prorl"):
        run_training(cfg, resolved)
    assert not partial.exists() and not list(ckpts.glob(".tmp-*"))
    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[:4] == before[:4]  # the history up to the checkpoint is untouched
    (event,) = [e for e in _rows(run / "events.jsonl") if e["event"] == "resume_cleanup"]
    assert event["removed_partial_checkpoints"] == [partial.name]
    assert event["metrics.jsonl_torn_line"] == '{"step": 6, "reward/mean": 0.2'
    assert event["events.jsonl_torn_line"] == '{"step": 6, "ev'
    assert "metrics.jsonl_torn_line" in caplog.text and partial.name in caplog.text


def test_truncate_logs_names_damage_and_rewrites_atomically(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "x": s / 3}) for s in range(4)]
    log.write_text("\n".join(good) + "\n" + '{"step": 4, "x"')
    assert read_jsonl(log) == ([json.loads(g) for g in good], '{"step": 4, "x"')
    # a kill while the resume rewrites the file leaves it as it was (never empty, never half)
    text = log.read_text()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        truncate_logs(tmp_path, 2)
    monkeypatch.undo()
    assert log.read_text() == text
    assert truncate_logs(tmp_path, 2) == {"metrics.jsonl_torn_line": '{"step": 4, "x"', "metrics.jsonl_rows_dropped": 1}
    assert log.read_text() == "\n".join(good[:3]) + "\n"
    # a last row whose newline was cut gets it back, so the next row appended starts a line of its own
    log.write_text(good[0] + "\n" + good[1])
    assert truncate_logs(tmp_path, 9) == {}
    assert log.read_text() == good[0] + "\n" + good[1] + "\n"
    # damage before the last line is not a torn write: named, file and line
    log.write_text(good[0] + "\n{oops\n" + good[1] + "\n")
    with pytest.raises(LogFileError, match=r"metrics.jsonl, line 2"):
        truncate_logs(tmp_path, 1)
    log.write_text(good[0] + "\n" + '{"x": 1}' + "\n" + good[1] + "\n")
    with pytest.raises(LogFileError, match=r'line 2: not a JSON object with an integer "step"'):
        read_jsonl(log)


# ---------------------------------------------------------------- 10. what the docs say
def test_stage_files_say_the_optimizer_reset_follows_its_key():
    for f in sorted((REPO / "conf" / "stage").glob("run*.yaml")):
        text = f.read_text()
        assert "algo.reference_reset.reset_optimizer" in text, f
        assert "hard reset of the reference policy and the optimizer." not in text, f


@pytest.mark.parametrize("reset_optimizer", [False, True])
def test_a_new_stage_resets_the_optimizer_only_when_configured(tiny_model_dir, six_steps, tmp_path, reset_optimizer):
    from nemo_prorl.train import build_trainer
    from nemo_prorl.trainer.logger import MetricsLogger

    run = _copy(six_steps, tmp_path)
    cfg, resolved = load_config(_args(tiny_model_dir, run, "resume=auto", "stage_name=run2", "trainer.num_steps=7",
                                      f"algo.reference_reset.reset_optimizer={str(reset_optimizer).lower()}"))
    trainer = build_trainer(cfg, resolved)
    try:
        before = trainer.policy.optimizer.state_dict()["state"]
        assert before, "the checkpoint's optimizer has no state"
        logger = MetricsLogger(run, total_steps=7, start_step=6, tensorboard=False, progress_bar=False)
        trainer._begin(logger, 6, {})
        logger.close()
        after = trainer.policy.optimizer.state_dict()["state"]
        assert (after == {}) is reset_optimizer
        (event,) = [e for e in _rows(run / "events.jsonl") if e["event"] == "reference_reset" and e["step"] == 6]
        assert event["reset_optimizer"] is reset_optimizer and event["reason"].startswith("stage run2 starts")
    finally:
        trainer.engine.close()
        trainer.policy.close()
        trainer.rewards.close()


def test_a_second_stop_signal_is_not_caught(monkeypatch):
    """The first SIGTERM asks for a checkpoint after the step; the handler is then the previous one again,
    so a second SIGTERM gets the process's earlier disposition (by default: the process ends at once,
    without a checkpoint or PREEMPTED marker, as the README's preemption section says)."""
    from nemo_prorl.trainer.grpo import StopSignals

    earlier = []
    old = signal.signal(signal.SIGTERM, lambda s, f: earlier.append(s))
    try:
        with StopSignals() as stop:
            _signal_main_thread(lambda: stop.signal is not None)
            assert stop.signal == "SIGTERM" and earlier == []
            _signal_main_thread(lambda: earlier)
            assert earlier == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)
    assert "A second SIGTERM" in (REPO / "README.md").read_text()


def _signal_main_thread(handled) -> None:
    """SIGTERM to this (main) thread; Python runs its handler between bytecodes, so wait for it by count."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    for _ in range(10_000):
        if handled():
            return
        time.sleep(0.001)
