"""The reward-hacking alarm: golden cases of the trend test (algo/hacking.py), the trainer's side of it
(trainer/validate.py HackingWatch) with the real MetricsLogger (metrics.jsonl, events.jsonl, TensorBoard,
the progress bar), the config key, and that its state survives a checkpoint's JSON exactly."""

import json
import logging
import math

import pytest
import torch

from nemo_prorl.algo.hacking import divergence_streak, hacking_flags
from nemo_prorl.config import ConfigError, load_config
from nemo_prorl.config.schema import HackingAlarmConfig, ProRLConfig
from nemo_prorl.trainer.logger import MetricsLogger
from nemo_prorl.trainer.validate import HackingWatch

NAN = math.nan


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------------------------- the pure trend test


def test_rising_train_and_falling_val_for_patience_validations_raise_the_alarm():
    # one domain: train 0.2 -> 0.3 -> 0.4 -> 0.5, val 0.6 -> 0.55 -> 0.5 -> 0.45: 3 diverging validations
    train, val = t([[0.2], [0.3], [0.4], [0.5]]), t([[0.6], [0.55], [0.5], [0.45]])
    assert divergence_streak(train, val, 0.01).tolist() == [3]
    assert hacking_flags(train, val, patience=3, min_delta=0.01).tolist() == [True]
    assert hacking_flags(train, val, patience=4, min_delta=0.01).tolist() == [False]  # one short
    assert hacking_flags(train[:3], val[:3], patience=3, min_delta=0.01).tolist() == [False]


def test_changes_within_min_delta_are_noise_and_raise_nothing():
    # the same shape, each change 0.005: below a threshold of 0.01, whichever way it goes
    train, val = t([[0.2], [0.205], [0.21], [0.215]]), t([[0.6], [0.595], [0.59], [0.585]])
    assert divergence_streak(train, val, 0.01).tolist() == [0]
    assert hacking_flags(train, val, 3, 0.01).tolist() == [False]
    # rising train with flat-ish validation, and falling validation with flat train, are no alarm either
    flat_val = t([[0.5], [0.5], [0.505], [0.5]])
    assert hacking_flags(t([[0.1], [0.3], [0.5], [0.7]]), flat_val, 3, 0.01).tolist() == [False]
    assert hacking_flags(t([[0.5], [0.5], [0.5], [0.5]]), t([[0.9], [0.7], [0.5], [0.3]]), 3, 0.01).tolist() == [False]
    # both rising (learning) and both falling (collapse) are not the hacking signature
    assert hacking_flags(t([[0.1], [0.2], [0.3], [0.4]]), t([[0.1], [0.2], [0.3], [0.4]]), 3, 0.01).tolist() == [False]
    assert hacking_flags(t([[0.4], [0.3], [0.2], [0.1]]), t([[0.4], [0.3], [0.2], [0.1]]), 3, 0.01).tolist() == [False]


def test_a_recovery_resets_the_streak():
    # diverging, diverging, then validation recovers, then diverging twice: the streak is 2, not 4
    train = t([[0.1], [0.2], [0.3], [0.4], [0.5], [0.6]])
    val = t([[0.9], [0.8], [0.7], [0.75], [0.65], [0.55]])
    assert divergence_streak(train, val, 0.01).tolist() == [2]
    assert hacking_flags(train, val, 3, 0.01).tolist() == [False]
    assert hacking_flags(train, val, 2, 0.01).tolist() == [True]
    # a training reward that stops rising for one validation resets it too
    train = t([[0.1], [0.2], [0.2], [0.3], [0.4]])
    val = t([[0.9], [0.8], [0.7], [0.6], [0.5]])
    assert divergence_streak(train, val, 0.01).tolist() == [2]


def test_domains_are_judged_apart_and_a_missing_figure_ends_a_streak():
    train = t([[0.1, 0.1, NAN], [0.2, 0.2, 0.2], [0.3, NAN, 0.3], [0.4, 0.4, 0.4]])
    val = t([[0.9, 0.9, 0.9], [0.8, 0.9, 0.8], [0.7, 0.8, 0.7], [0.6, 0.7, 0.6]])
    # math: diverges 3 times; code: validation flat then a gap; stem: no training figure at the first
    assert divergence_streak(train, val, 0.01).tolist() == [3, 0, 2]
    assert hacking_flags(train, val, 3, 0.01).tolist() == [True, False, False]


def test_patience_zero_disables_and_shapes_must_match():
    train, val = t([[0.1], [0.2], [0.3], [0.4]]), t([[0.9], [0.8], [0.7], [0.6]])
    assert hacking_flags(train, val, 0, 0.01).tolist() == [False]
    with pytest.raises(ValueError, match="validations, domains"):
        divergence_streak(train, val[:3], 0.01)
    with pytest.raises(ValueError, match="validations, domains"):
        divergence_streak(train[:, 0], val[:, 0], 0.01)


# --------------------------------------------------------------------------------------- config


def test_config_defaults_and_a_misspelt_key_fails_at_launch():
    cfg, _ = load_config([])
    assert cfg.trainer.hacking_alarm == HackingAlarmConfig(patience=3, min_delta=0.01)
    assert ProRLConfig().trainer.hacking_alarm.patience == 3
    cfg, _ = load_config(["trainer.hacking_alarm.patience=0", "trainer.hacking_alarm.min_delta=0.05"])
    assert (cfg.trainer.hacking_alarm.patience, cfg.trainer.hacking_alarm.min_delta) == (0, 0.05)
    with pytest.raises(ConfigError, match="patiense"):
        load_config(["trainer.hacking_alarm.patiense=2"])
    with pytest.raises(ValueError, match="trainer.hacking_alarm"):
        HackingWatch(HackingAlarmConfig(patience=-1), "pass@1")
    for key in ("patience=-1", "min_delta=-0.1"):  # refused at launch, naming the key
        with pytest.raises(ConfigError, match=f"trainer.hacking_alarm.{key.split('=')[0]}"):
            load_config([f"trainer.hacking_alarm.{key}"])


# ------------------------------------------------------------------------- the trainer's side, real logger


def _step(math_reward, code_reward):
    """A training step's metrics as generation_metrics writes them (with figures that are no domain's)."""
    return {"reward/mean": (math_reward + code_reward) / 2, "reward/math": math_reward, "reward/code": code_reward,
            "reward/error_frac": 0.0, "reward/timeout_frac": 0.0, "reward/code/pass_frac": 0.5}


def _validation(math_val, code_val):
    """A validation's metrics as trainer/validate.py returns them."""
    return {"val/pass@1": (math_val + code_val) / 2, "val/pass@1/math": math_val, "val/pass@1/code": code_val,
            "val/reward": 0.5, "val/reward/math": 0.5, "val/reward/code": 0.5, "val/reward/error_frac": 0.0}


# (train math, train code) for the steps before each validation, then (val math, val code); math is hacked
# from the second validation on: its training reward climbs while its validation pass@1 falls.
SCRIPT = [
    ([], (0.50, 0.30)),  # step 0: the starting policy, no training yet
    ([(0.30, 0.20), (0.32, 0.22)], (0.50, 0.32)),
    ([(0.40, 0.24), (0.42, 0.26)], (0.45, 0.34)),
    ([(0.50, 0.28), (0.52, 0.30)], (0.40, 0.36)),
    ([(0.60, 0.32), (0.62, 0.34)], (0.35, 0.38)),  # third diverging validation in a row: alarm
    ([(0.70, 0.36), (0.72, 0.38)], (0.30, 0.40)),  # still
    ([(0.70, 0.40), (0.70, 0.42)], (0.50, 0.42)),  # recovery: cleared
]


def _drive(watch, logger, script, first_step=0, steps_per_val=2):
    """Feeds the script through the hook as ProRLTrainer.run_step does; returns each validation's alarm figures."""
    step, seen = first_step, []
    for steps, (vm, vc) in script:
        for rm, rc in steps:
            step += 1
            metrics = _step(rm, rc)
            watch.observe_step(metrics)
            if logger is not None:
                logger.log(step, metrics)
        out = {**_validation(vm, vc), **watch.observe_validation(step, _validation(vm, vc))}
        if logger is not None:
            logger.log(step, out)
            logger.advance(step, out)
        seen.append({k: v for k, v in out.items() if k.startswith("alarm/")})
    return seen


def test_the_hook_warns_in_the_log_events_metrics_tensorboard_and_the_bar(tmp_path, caplog):
    watch = HackingWatch(HackingAlarmConfig(patience=3, min_delta=0.01), "pass@1")
    logger = MetricsLogger(tmp_path, total_steps=20, start_step=0, tensorboard=True, progress_bar=True)
    try:
        with caplog.at_level(logging.WARNING, logger="nemo_prorl.trainer.validate"):
            seen = _drive(watch, logger, SCRIPT[:5])
            assert logger.bar is not None and "reward hacking? math" in logger.bar.desc
            assert logger.alarms == ["math"]
            seen += _drive(watch, logger, SCRIPT[5:], first_step=8)
            assert "reward hacking" not in logger.bar.desc and logger.alarms == []  # cleared by the recovery
    finally:
        logger.close()
    flags = [(s["alarm/reward_hacking/math"], s["alarm/reward_hacking/code"]) for s in seen]
    assert flags == [(0, 0), (0, 0), (0, 0), (0, 0), (1, 0), (1, 0), (0, 0)]
    assert set(seen[0]) == {"alarm/reward_hacking/math", "alarm/reward_hacking/code"}  # domains only
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("'math'" in w and "val/pass@1/math" in w and "3 validations in a row" in w
                                      for w in warnings), warnings
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["alarm/reward_hacking/math"]) for r in rows if "alarm/reward_hacking/math" in r] == \
        [(0, 0.0), (2, 0.0), (4, 0.0), (6, 0.0), (8, 1.0), (10, 1.0), (12, 0.0)]
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["event"], e["domains"]) for e in events] == [
        (8, "reward_hacking_alarm", ["math"]), (10, "reward_hacking_alarm", ["math"]),
        (12, "reward_hacking_alarm_cleared", ["math"])]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("alarm/reward_hacking/math")][3:6] == [(6, 0.0), (8, 1.0), (10, 1.0)]


def _drive_metrics(watch, rounds):
    """Each round: (training steps' metrics, a validation's metrics); returns each validation's alarm figures."""
    seen = []
    for step, (steps, val) in enumerate(rounds):
        for m in steps:
            watch.observe_step(m)
        seen.append({k: v for k, v in watch.observe_validation(step, val).items() if k.startswith("alarm/")})
    return seen


def test_a_validation_without_a_domains_figure_ends_its_streak():
    """The rule of algo/hacking.py: a validation where a domain has no figure ends that domain's streak; the
    next streak starts from its next two validations with figures (no bridging over the gap). math diverges
    at every validation it reports; at the fourth, validation reports code only."""
    math_train, math_val = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    rounds = []
    for i in range(6):
        val = {"val/pass@1/code": 0.5, **({} if i == 3 else {"val/pass@1/math": math_val[i]})}
        rounds.append(([{"reward/math": math_train[i], "reward/code": 0.5}] if i else [], val))
    seen = _drive_metrics(HackingWatch(HackingAlarmConfig(patience=3, min_delta=0.01), "pass@1"), rounds)
    assert [s.get("alarm/reward_hacking/math") for s in seen] == [0.0, 0.0, 0.0, None, 0.0, 0.0]
    # the same without the gap: alarm from the fifth validation on (no training figure before the first one,
    # so three diverging changes in a row are first complete there); the gap alone kept it down above
    rounds[3][1]["val/pass@1/math"] = math_val[3]
    seen = _drive_metrics(HackingWatch(HackingAlarmConfig(patience=3, min_delta=0.01), "pass@1"), rounds)
    assert [s.get("alarm/reward_hacking/math") for s in seen] == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    # a window without a training figure for math ends its streak the same way
    rounds[3] = ([{"reward/code": 0.5}], rounds[3][1])
    seen = _drive_metrics(HackingWatch(HackingAlarmConfig(patience=3, min_delta=0.01), "pass@1"), rounds)
    assert [s.get("alarm/reward_hacking/math") for s in seen] == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_an_alarm_that_clears_at_the_first_validation_after_a_resume_is_logged_cleared(tmp_path):
    """Raised before the checkpoint, cleared at the first validation of the resumed run (new watch from the
    checkpoint's JSON, new MetricsLogger on the same run folder, as ProRLTrainer.fit builds them): the events
    log says it cleared, and the bar no longer names it."""
    cfg = HackingAlarmConfig(patience=3, min_delta=0.01)
    first = HackingWatch(cfg, "pass@1")
    logger = MetricsLogger(tmp_path, total_steps=20, start_step=0, tensorboard=False, progress_bar=True)
    try:
        _drive(first, logger, SCRIPT[:6])  # raised at step 8, still at 10; the checkpoint is at step 10
    finally:
        logger.close()
    saved = json.loads(json.dumps({"step": 10, "hacking_alarm": first.state_dict()}))
    resumed = HackingWatch(cfg, "pass@1")
    resumed.load_state_dict(saved["hacking_alarm"])
    logger = MetricsLogger(tmp_path, total_steps=20, start_step=10, tensorboard=False, progress_bar=True)
    try:
        logger.restore_alarms(resumed.alarmed)  # what ProRLTrainer.fit hands over at start (the bar only)
        assert "reward hacking? math" in logger.bar.desc
        seen = _drive(resumed, logger, SCRIPT[6:], first_step=10)  # the recovery: cleared at step 12
        assert "reward hacking" not in logger.bar.desc and logger.alarms == []
    finally:
        logger.close()
    assert seen[0]["alarm/reward_hacking/math"] == 0.0
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["event"], e["domains"]) for e in events] == [
        (8, "reward_hacking_alarm", ["math"]), (10, "reward_hacking_alarm", ["math"]),
        (12, "reward_hacking_alarm_cleared", ["math"])]


def test_validation_reward_metric_and_patience_zero():
    # validation.metric=reward compares with val/reward/<domain>; error_frac is no domain
    watch = HackingWatch(HackingAlarmConfig(patience=3), "reward")
    out = watch.observe_validation(0, _validation(0.5, 0.5))
    assert set(out) == {"alarm/reward_hacking/math", "alarm/reward_hacking/code"}
    off = HackingWatch(HackingAlarmConfig(patience=0), "pass@1")
    assert _drive(off, None, SCRIPT) == [{}] * len(SCRIPT)
    assert off.state_dict() == {"history": {}, "window": {}, "alarmed": []}


def test_the_state_survives_a_checkpoint_exactly():
    """Stopped between two validations (a partial window of steps), saved as the trainer's checkpoint saves
    trainer_state.json and read back as resume reads it: the resumed watch gives the same alarms and ends in
    the same state as one that never stopped."""
    cfg = HackingAlarmConfig(patience=3, min_delta=0.01)
    whole = HackingWatch(cfg, "pass@1")
    whole_seen = _drive(whole, None, SCRIPT)

    first = HackingWatch(cfg, "pass@1")
    seen = _drive(first, None, SCRIPT[:3])
    for rm, rc in SCRIPT[3][0][:1]:  # one step of the next window, then the checkpoint
        first.observe_step(_step(rm, rc))
    saved = json.loads(json.dumps({"step": 5, "hacking_alarm": first.state_dict()}, indent=1))
    resumed = HackingWatch(cfg, "pass@1")
    resumed.load_state_dict(saved["hacking_alarm"])
    assert resumed.state_dict() == first.state_dict()
    rest = [(SCRIPT[3][0][1:], SCRIPT[3][1]), *SCRIPT[4:]]
    seen += _drive(resumed, None, rest, first_step=5)
    assert seen == whole_seen
    assert resumed.state_dict() == whole.state_dict()
    # a checkpoint from before the alarm existed starts an empty history
    old = HackingWatch(cfg, "pass@1")
    old.load_state_dict(None)
    assert old.state_dict() == {"history": {}, "window": {}, "alarmed": []}
