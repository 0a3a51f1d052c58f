"""ProRL v2: the scheduled cosine length penalty (golden values), DAPO's batch multiplier, and the presets
experiment=prorl_v2_1p5b and its CPU miniature experiment=prorl_v2_cpu_tiny."""

import math

import pytest
import torch

from nemo_prorl.algo.shaping import cosine_length_penalty, length_penalised, length_penalty_active
from nemo_prorl.config import ConfigError, load_config
from nemo_prorl.config.schema import RewardConfig
from nemo_prorl.data import synthetic
from nemo_prorl.rewards import REWARDS, RewardResult
from nemo_prorl.rollout.base import Completion
from nemo_prorl.trainer.producer import prompts_per_round
from nemo_prorl.trainer.scoring import Scores, length_penalty_step, shaped_rewards
from tests.conftest import TINY_OVERRIDES


# ------------------------------------------------------------------ the penalty: golden values
def test_cosine_length_penalty_golden_values():
    # L_max = 12, boundaries [-0.5, 0]: (1 + cos(pi L / 12)) / 2 = 1, 0.853553, 0.5, 0.146447, 0 at L = 0, 3, 6, 9,
    # 12 (and 0 past the limit, clamped), so the penalty is -0.5 + 0.5 x that
    lengths = torch.tensor([0, 3, 6, 9, 12, 20])
    out = cosine_length_penalty(lengths, max_response_length=12, min_value=-0.5, max_value=0.0)
    assert torch.allclose(out, torch.tensor([0.0, -0.0732233, -0.25, -0.4267767, -0.5, -0.5]), atol=1e-6)
    # a bonus for short answers as well: max_value at L = 0, the boundaries' mean at L_max / 2
    out = cosine_length_penalty(torch.tensor([0, 6, 12]), max_response_length=12, min_value=-0.3, max_value=0.2)
    assert torch.allclose(out, torch.tensor([0.2, -0.05, -0.3]), atol=1e-6)


def test_length_penalised_scales_rewarded_responses_and_adds_to_all():
    # rewards 1 and 0.5 at L = 3 (penalty -0.0732233), 0.9 and 1 at L_max = 12 (-0.5), a 0 at L = 6 (-0.25), a
    # truncated 1 and a negative (overlong-punished) -0.2 at L = 9 (-0.4267767)
    rewards = torch.tensor([1.0, 0.5, 0.9, 1.0, 0.0, 1.0, -0.2])
    penalty = torch.tensor([-0.0732233, -0.0732233, -0.5, -0.5, -0.25, -0.4267767, -0.4267767])
    truncated = torch.tensor([False, False, False, False, False, True, False])
    out = length_penalised(rewards, penalty, truncated, rewarded_only=True)
    # reward x (1 + penalty): 0.9267767, 0.5 x 0.9267767, 0.9 x 0.5, 1 x 0.5; 0, truncated and negative unchanged.
    # A partial 0.9 at L_max (0.45) no longer beats a full answer at L_max (0.5), and nothing rewarded reaches 0.
    assert torch.allclose(out, torch.tensor([0.9267767, 0.4633884, 0.45, 0.5, 0.0, 1.0, -0.2]), atol=1e-6)
    out = length_penalised(rewards, penalty, truncated, rewarded_only=False)  # apply_to=all: reward + penalty
    assert torch.allclose(out, torch.tensor([0.9267767, 0.4267767, 0.4, 0.5, -0.25, 0.5732233, -0.6267767]), atol=1e-6)


def test_length_penalty_schedule_cycles_on_and_off():
    # the blog's example from the first trainer step (steps count from 1): 100 steps on, 500 off, over and over
    on = [s for s in range(1, 1301) if length_penalty_active(s, start_step=1, on_steps=100, off_steps=500)]
    assert on == [*range(1, 101), *range(601, 701), *range(1201, 1301)]
    # the miniature's: from step 1, 10 on and 50 off
    on = [s for s in range(1, 130) if length_penalty_active(s, start_step=1, on_steps=10, off_steps=50)]
    assert on == [*range(1, 11), *range(61, 71), *range(121, 130)]
    assert not length_penalty_active(4, start_step=5, on_steps=None, off_steps=0)
    assert length_penalty_active(5, start_step=5, on_steps=None, off_steps=0)  # null: always on from start_step
    with pytest.raises(ValueError):
        length_penalty_active(3, start_step=1, on_steps=0, off_steps=0)


def _completion(length: int, finish_reason: str = "stop") -> Completion:
    return Completion(prompt_index=0, token_ids=[5] * length, logprobs=[0.0] * length, finish_reason=finish_reason)


def test_length_penalty_step_applies_at_the_scheduled_steps_only():
    cfg = RewardConfig()
    lp = cfg.length_penalty
    lp.on_steps, lp.off_steps = 1, 1  # from step 1: on at odd steps
    groups = [torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0])]
    completions = [_completion(3), _completion(6), _completion(9), _completion(12, "length")]
    assert length_penalty_step(groups, completions, cfg, 12, step=1) == (groups, {})  # disabled: untouched
    lp.enabled = True
    out, metrics = length_penalty_step(groups, completions, cfg, 12, step=1)
    # 1 x 0.9267767 (L = 3); the 0 stays 0; 0.5 x 0.5732233 (L = 9); the truncated 1 is stop-properly's business
    assert torch.allclose(torch.cat(out), torch.tensor([0.9267767, 0.0, 0.2866117, 1.0]), atol=1e-6)
    # the mean change: (-0.0732233 - 0.2133883) / 4
    assert metrics["reward/length_penalty/active"] == 1.0
    assert metrics["reward/length_penalty/mean"] == pytest.approx(-0.0716529, abs=1e-6)
    out, metrics = length_penalty_step(groups, completions, cfg, 12, step=2)
    assert out == groups and metrics == {"reward/length_penalty/active": 0.0, "reward/length_penalty/mean": 0.0}
    # DAPO's filter sees the rewards without it: shaped_rewards takes no step and ignores it
    scores = Scores(rewards=torch.tensor([1.0, 1.0]), correct=torch.tensor([True, True]), lengths=torch.tensor([3, 9]),
                    truncated=torch.tensor([False, False]), statuses=["ok"] * 2, domains=["digits"] * 2)
    assert shaped_rewards(scores, cfg, max_response_length=12).tolist() == [1.0, 1.0]


# ------------------------------------------------------------------ DAPO's batch multiplier
def test_prompts_per_round_rounds_up_the_multiplied_need():
    assert prompts_per_round(32, 1.5, True) == 48  # the miniature
    assert prompts_per_round(256, 1.5, True) == 384  # the 1.5B recipe
    assert prompts_per_round(10, 1.25, True) == 13
    assert prompts_per_round(20, 1.1, True) == 22  # 20 x 1.1 is 22.000000000000004 in floating point
    assert prompts_per_round(32, 1.0, True) == 32
    assert prompts_per_round(32, 1.5, False) == 32  # without dynamic sampling nothing is filtered


def _partial_credit(text: str) -> float:
    return (len(text) % 3) / 2  # 0, 0.5 or 1: rewards that differ inside most groups


class SwitchedReward:
    """Every answer right (mode "one"), or partial credit by the text's length (mode "partial")."""

    mode = "one"

    def score(self, inp):
        r = 1.0 if SwitchedReward.mode == "one" else _partial_credit(inp.response)
        return RewardResult(r, correct=r == 1.0)


@pytest.fixture(scope="module")
def v2_trainer(tiny_model_dir, tmp_path_factory):
    """The real trainer on the tiny model with SwitchedReward: 4 prompts a step x 1.5, at most 2 rounds, the
    length penalty (apply_to=correct) on at odd steps, a truncated response scored 0."""
    from nemo_prorl.train import build_trainer

    mp = pytest.MonkeyPatch()
    if "test_switched" not in REWARDS:
        REWARDS.register("test_switched")(lambda cfg=None: SwitchedReward())
    for task in ("reverse", "sort"):
        mp.setitem(synthetic.TASK_REWARDS, task, "test_switched")
    cfg, resolved = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", "reward.overlong.enabled=false",
                                 "reward.stop_properly.enabled=true", "rollout.max_response_length=12",
                                 "algo.dynamic_sampling.batch_multiplier=1.5",
                                 "algo.dynamic_sampling.max_generation_rounds=2", "reward.length_penalty.enabled=true",
                                 "reward.length_penalty.on_steps=1", "reward.length_penalty.off_steps=1",
                                 f"trainer.output_dir={tmp_path_factory.mktemp('prorl_v2')}"])
    trainer = build_trainer(cfg, resolved)
    yield trainer
    trainer.engine.close()
    trainer.policy.close()
    mp.undo()


def _assert_rewards(t, groups, penalty_on: bool) -> None:
    """Each kept group: its rewards before the penalty differ (that is what DAPO's filter kept it for), and
    the rewards it trains on are those, x (1 + penalty(L)) where positive and stopped, if the penalty is on."""
    n = t.cfg.algo.num_generations_per_prompt
    for g, rewards in enumerate(groups.rewards):
        cs = groups.completions[g * n:(g + 1) * n]
        base = [0.0 if c.finish_reason == "length" else
                _partial_credit(t.tokenizer.decode(c.token_ids, skip_special_tokens=True)) for c in cs]
        assert len(set(base)) > 1
        expected = [b * (1 - 0.5 * (1 - math.cos(math.pi * min(len(c.token_ids), 12) / 12)) / 2)
                    if penalty_on and b > 0 else b for b, c in zip(base, cs)]
        assert torch.allclose(rewards, torch.tensor(expected), atol=1e-6), (rewards, expected)


def test_the_filter_sees_rewards_without_the_length_penalty(v2_trainer):
    from nemo_prorl.trainer.phases import PhaseTimer

    t, start = v2_trainer, v2_trainer.prompts_consumed
    SwitchedReward.mode = "one"
    t.cfg.reward.stop_properly.enabled = False  # a truncated response keeps its 1.0 too
    try:
        # step 1, the penalty on: every group is all 1.0, uniform however its lengths differ, so none is kept
        # and both rounds run, 6 prompts each (4 x 1.5)
        groups, metrics = t.collect_groups(1, PhaseTimer())
    finally:
        t.cfg.reward.stop_properly.enabled = True
    assert len(groups) == 0 and metrics["filter/generation_rounds"] == 2.0 and t.prompts_consumed == start + 12
    assert metrics["filter/filtered_group_frac"] == 1.0 and metrics["reward/length_penalty/active"] == 1.0


def test_sync_steps_draw_the_multiplied_prompts_and_penalise_kept_groups(v2_trainer):
    from nemo_prorl.trainer.phases import PhaseTimer

    t, need = v2_trainer, v2_trainer.cfg.algo.num_prompts_per_step
    SwitchedReward.mode = "partial"
    for step, on in ((2, False), (3, True)):
        start = t.prompts_consumed
        groups, metrics = t.collect_groups(step, PhaseTimer())
        assert len(groups) >= 1 and t.prompts_consumed == start + 6 * metrics["filter/generation_rounds"]
        assert len(groups) == metrics["filter/kept_groups"] <= need  # the surplus of a round is dropped
        assert metrics["reward/length_penalty/active"] == float(on)
        assert (metrics["reward/length_penalty/mean"] < 0) == on  # some kept response was penalised
        _assert_rewards(t, groups, penalty_on=on)


def test_async_steps_penalise_by_the_step_that_takes_the_groups(v2_trainer):
    """The producer scores ahead, before it knows which step will train on a group: the penalty is the taking
    step's (on at odd steps), whenever the scorer got to the group."""
    from nemo_prorl.trainer.phases import PhaseTimer

    t = v2_trainer
    SwitchedReward.mode = "partial"
    t.max_staleness = 1  # no update happens here: every group is of the current version
    t.start_producer()
    try:
        for step, on in ((4, False), (5, True), (6, False)):
            groups, metrics = t.collect_groups(step, PhaseTimer())
            assert len(groups) >= 1 and metrics["reward/length_penalty/active"] == float(on)
            assert (metrics["reward/length_penalty/mean"] < 0) == on
            _assert_rewards(t, groups, penalty_on=on)
            # prompts examined, in rounds of 6 (4 x 1.5) as a synchronous step draws them: at most 2
            assert 0 < metrics["filter/generation_rounds"] <= 2
    finally:
        t.producer.stop()
        t.producer, t.max_staleness = None, 0


# ------------------------------------------------------------------ the presets
def test_prorl_v2_1p5b_pins_the_published_recipe():
    from nemo_prorl.cluster.plan import plan_from_config

    cfg, _ = load_config(["experiment=prorl_v2_1p5b"])
    a, lp = cfg.algo, cfg.reward.length_penalty
    assert cfg.experiment_name == "prorl_v2_1p5b" and cfg.model.path.endswith("DeepSeek-R1-Distill-Qwen-1.5B")
    assert (a.num_prompts_per_step, a.num_generations_per_prompt, a.num_prompts_per_minibatch) == (256, 16, 64)
    assert (a.advantage_estimator, a.clip_eps_low, a.clip_eps_high, a.loss_agg_mode) == \
        ("reinforce_pp_baseline", 0.2, 0.27, "token-mean")
    assert (a.kl_coef, a.kl_estimator) == (1e-4, "k2")
    ds = a.dynamic_sampling
    assert (ds.enabled, ds.batch_multiplier, ds.max_generation_rounds) == (True, 1.5, 10)
    rc = a.rollout_correction
    assert (rc.mode, rc.icepop_low, rc.icepop_high, rc.seq_geo_mask) == ("icepop", 0.5, 5.0, False)
    r = a.reference_reset
    assert (r.every_n_steps, r.stall_patience, r.reset_optimizer) == (500, 5, False)
    assert cfg.reward.stop_properly.enabled and cfg.reward.stop_properly.truncated_reward_scale == 0.0
    assert not cfg.reward.overlong.enabled  # NeMo-RL's guide: stop-properly instead of DAPO's overlong shaping
    assert (lp.enabled, lp.max_value, lp.min_value, lp.apply_to, lp.start_step, lp.on_steps, lp.off_steps) == \
        (True, 0.0, -0.5, "correct", 1, 100, 500)
    assert (cfg.rollout.temperature, cfg.rollout.max_response_length, cfg.trainer.num_steps) == (1.2, 8192, 3000)
    assert (cfg.policy.optim.lr, cfg.policy.backend, cfg.rollout.engine) == (2e-6, "megatron", "vllm")
    plan = plan_from_config(cfg)  # what `prorl plan experiment=prorl_v2_1p5b` prints
    assert len(plan.ranks) == 32


def test_prorl_v2_cpu_tiny_composes_at_cpu_tiny_scale():
    cfg, _ = load_config(["experiment=prorl_v2_cpu_tiny"])
    tiny, _ = load_config(["experiment=cpu_tiny"])
    a = cfg.algo
    assert cfg.experiment_name == "prorl_v2_cpu_tiny" and cfg.model.path is None
    for key in ("num_prompts_per_step", "num_generations_per_prompt", "num_prompts_per_minibatch", "kl_coef"):
        assert getattr(a, key) == getattr(tiny.algo, key), key
    assert (cfg.rollout.max_response_length, cfg.trainer.num_steps) == (12, 120)
    assert (cfg.policy.backend, cfg.rollout.engine) == ("hf", "torch")
    assert (a.advantage_estimator, a.clip_eps_low, a.clip_eps_high, a.kl_estimator) == \
        ("reinforce_pp_baseline", 0.2, 0.27, "k2")
    assert (a.dynamic_sampling.batch_multiplier, a.rollout_correction.mode) == (1.5, "icepop")
    assert (a.reference_reset.every_n_steps, a.reference_reset.reset_optimizer) == (40, False)
    assert cfg.reward.stop_properly.enabled and cfg.reward.length_penalty.enabled


@pytest.mark.parametrize("override,message", [
    ("reward.length_penalty.apply_to=wrong", "reward.length_penalty.apply_to='wrong': allowed values: correct, all"),
    ("reward.length_penalty.min_value=0.5", "reward.length_penalty.min_value=0.5: must be <= "),
    ("reward.length_penalty.min_value=-1.0", "reward.length_penalty.min_value=-1.0: must be > -1 with apply_to="),
    ("reward.overlong.enabled=true", "reward.overlong.penalty_factor=1.0: must be < 1 with reward.length_penalty"),
    ("reward.length_penalty.apply_to=all reward.length_penalty.min_value=-1.0",
     "max_value - min_value must be < 1 with apply_to=all"),
    ("reward.length_penalty.start_step=0", "reward.length_penalty.start_step=0: must be >= 1"),
    ("reward.length_penalty.on_steps=0", "reward.length_penalty.on_steps=0: must be >= 1 or null"),
    ("algo.dynamic_sampling.batch_multiplier=0.5", "algo.dynamic_sampling.batch_multiplier=0.5: must be >= 1"),
])
def test_bad_length_penalty_and_multiplier_keys_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(["experiment=prorl_v2_cpu_tiny", *override.split()])
    assert message in str(e.value)
