import subprocess
import sys

import pytest

from nemo_prorl.config import ConfigError, load_config


def test_default_is_cpu_tiny():
    cfg, resolved = load_config([])
    assert cfg.experiment_name == "cpu_tiny"
    assert cfg.policy.backend == "hf" and cfg.rollout.engine == "torch" and cfg.cluster.device == "cpu"
    assert cfg.model.path is None  # the tiny model is built locally
    assert resolved.trainer.output_dir == "runs/cpu_tiny"  # interpolations resolved before saving


def test_prorl_1p5b_pins_the_paper_recipe():
    cfg, _ = load_config(["experiment=prorl_1p5b"])
    a = cfg.algo
    assert (a.num_generations_per_prompt, a.num_prompts_per_step, a.num_prompts_per_minibatch) == (16, 256, 64)
    assert (a.clip_eps_low, a.clip_eps_high) == (0.2, 0.4)
    assert a.loss_agg_mode == "token-mean" and a.dynamic_sampling.enabled
    assert cfg.rollout.temperature == 1.2 and cfg.rollout.max_response_length == 8192
    assert cfg.policy.optim.lr == 2e-6 and cfg.policy.optim.warmup_steps == 0


def test_plus_experiment_spelling_is_accepted():
    cfg, _ = load_config(["+experiment=prorl_1p5b"])
    assert cfg.experiment_name == "prorl_1p5b"


def test_cli_override_reaches_the_typed_config():
    cfg, _ = load_config(["algo.clip_eps_high=0.28", "algo.dynamic_sampling.max_generation_rounds=5"])
    assert cfg.algo.clip_eps_high == 0.28 and cfg.algo.dynamic_sampling.max_generation_rounds == 5


def test_misspelt_key_fails_naming_it():
    with pytest.raises(ConfigError) as e:
        load_config(["algo.clip_eps_hgh=0.3"])
    assert "algo.clip_eps_hgh" in str(e.value) and "clip_eps_high" in str(e.value)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigError, match="algo.clip_eps_low"):
        load_config(["algo.clip_eps_low=abc"])


@pytest.mark.parametrize("override,message", [
    ("algo.clip_eps_low=-0.1", "algo.clip_eps_low=-0.1: must be >= 0"),
    ("algo.num_generations_per_prompt=1", "algo.num_generations_per_prompt=1: must be >= 2"),
    ("policy.backend=megatronn", "policy.backend='megatronn': allowed values: hf"),
    ("rollout.engine=vlm", "rollout.engine='vlm': allowed values: torch"),
    ("algo.advantage_estimator=ppo", "allowed values: dr_grpo, grpo, reinforce_pp_baseline"),
    ("algo.loss_agg_mode=sum", "algo.loss_agg_mode='sum': allowed values: token-mean"),
    ("validation.pass_k=[1,64]", "validation.pass_k"),
    ("reward.sandbox.backend=docker", "reward.sandbox.backend='docker': allowed values: local, remote"),
    ("reward.sandbox.backend=remote", "reward.sandbox.url='': must be an http(s):// URL"),
    ("reward.math.timeout_s=0", "reward.math.timeout_s=0.0: must be > 0"),
    ("logger.wandb.mode=onlin", "logger.wandb.mode='onlin': allowed values: auto, online, offline, disabled"),
    ("algo.rollout_correction.mode=is", "algo.rollout_correction.mode='is': allowed values: none, tis, icepop"),
    ("algo.rollout_correction.icepop_low=1.5", "algo.rollout_correction.icepop_low=1.5: need icepop_low <= 1"),
    ("rollout.mismatch_check_every_n_steps=-1", "rollout.mismatch_check_every_n_steps=-1: must be >= 0"),
])
def test_bad_values_fail_at_launch(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config([override])
    assert message in str(e.value)


def test_vllm_settings_are_checked_at_launch():
    with pytest.raises(ConfigError) as e:
        load_config(["rollout=vllm", "rollout.temperature=2.5", "rollout.vllm.max_model_len=100",
                     "rollout.vllm.kv_cache_gb=0"])
    msg = str(e.value)
    assert "rollout.temperature=2.5: vLLM samples at temperatures up to 2" in msg
    assert "rollout.vllm.max_model_len=100: must be >= data.max_prompt_length + rollout.max_response_length" in msg
    assert "rollout.vllm.kv_cache_gb=0.0: must be > 0 or null" in msg


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(["algo.clip_eps_low=-1", "rollout.temperature=0"])
    assert "algo.clip_eps_low" in str(e.value) and "rollout.temperature" in str(e.value)


def test_cli_exits_2_with_message():
    proc = subprocess.run([sys.executable, "-m", "nemo_prorl.cli", "train", "algo.kl_cof=0.1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "algo.kl_cof" in proc.stderr and "kl_coef" in proc.stderr


def test_cli_config_prints_resolved_yaml():
    proc = subprocess.run([sys.executable, "-m", "nemo_prorl.cli", "config", "algo.kl_coef=0.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "kl_coef: 0.5" in proc.stdout


def test_prorl_train_reexecs_under_a_fixed_hash_seed(monkeypatch):
    import sys

    from nemo_prorl import cli

    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda exe, argv: calls.append(argv))
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.setattr(sys, "argv", ["prorl", "train", "trainer.num_steps=1"])
    cli.ensure_hash_seed("config")
    assert calls == []
    cli.ensure_hash_seed("train")
    assert calls == [[sys.executable, "-m", "nemo_prorl.cli", "train", "trainer.num_steps=1"]]
    assert cli.os.environ["PYTHONHASHSEED"] == "0"
    cli.ensure_hash_seed("train")  # already set: no second exec
    assert len(calls) == 1
