"""Shared fixtures: a tiny Qwen2 and tokenizer built locally (no hub access), and a small config."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _ray_token_for_the_session() -> Path:
    """Ray reads its authentication settings once, when first imported, and keeps one token per process:
    every Ray cluster this test session starts uses this token (mode 0600, removed at exit) and binds
    loopback only."""
    import atexit
    import shutil
    import tempfile

    from nemo_prorl.cluster.runtime import auth_env, write_token

    os.environ.pop("RAY_AUTH_TOKEN", None)
    folder = Path(tempfile.mkdtemp(prefix="prorl-test-ray-"))
    atexit.register(shutil.rmtree, folder, True)  # and at the session's end (pytest_sessionfinish)
    return folder
    os.environ.update(auth_env(write_token(folder / "token")))
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Ray's memory monitor kills actors when the whole machine passes 95% memory: on a shared machine
    # another process's memory would fail a test that uses little itself (measured in CI with a heavy
    # neighbour: engine actors of 0.18 GB killed at 22.2 of 23.5 GB). Tests keep their own sizes small.
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"


_RAY_TOKEN_FOLDER: Path | None = None


def pytest_configure(config) -> None:
    """In pytest's own process, before any test module imports Ray; not at this module's import: a worker
    process spawned from a test module imports this module too, and one the test kills left its folder."""
    global _RAY_TOKEN_FOLDER
    if _RAY_TOKEN_FOLDER is None:
        _RAY_TOKEN_FOLDER = _ray_token_for_the_session()

# multiprocessing gives each process that needs one a `pymp-*` folder under the temp dir and removes it at
# exit; workers the tests kill (timeouts, crash tests) never do. At the session's end the `pymp-*` folders
# that appeared during it are removed, so that a machine running the suite daily does not fill /tmp.
# (TMPDIR is not redirected under pytest's basetemp: that is mode 0700, and the sandbox and rendezvous tests
# hand temp folders to other uids; Ray's socket paths must also stay under 108 bytes.)
_PYMP_BEFORE = frozenset(Path(tempfile.gettempdir()).glob("pymp-*"))


def pymp_folders_left(before=_PYMP_BEFORE) -> list[Path]:
    """The `pymp-*` folders under the temp dir that were not there when this session started."""
    return sorted(set(Path(tempfile.gettempdir()).glob("pymp-*")) - before)


def pytest_sessionfinish(session, exitstatus) -> None:
    import multiprocessing
    import shutil

    own = multiprocessing.current_process()._config.get("tempdir")  # this process's: its own exit removes it
    for folder in pymp_folders_left():
        if str(folder) != own:
            shutil.rmtree(folder, ignore_errors=True)
    if _RAY_TOKEN_FOLDER is not None:  # every test is done: Ray read the token long ago
        shutil.rmtree(_RAY_TOKEN_FOLDER, ignore_errors=True)


TINY_OVERRIDES = [
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.num_hidden_layers=2",
    "model.tiny.num_attention_heads=4",
    "model.tiny.num_key_value_heads=2",
    "model.warm_start.steps=20",
    "model.warm_start.num_examples=256",
    "algo.num_prompts_per_step=4",
    "algo.num_generations_per_prompt=4",
    "algo.num_prompts_per_minibatch=2",
    "policy.micro_batch_size=4",
    "rollout.max_response_length=6",
    # The untrained tiny model answers nothing right in 6 tokens: DAPO's overlong shaping (a penalty growing
    # over the last 4 tokens) gives its groups rewards that differ, so every step takes a real update.
    "reward.overlong.enabled=true",
    "reward.overlong.buffer_length=4",
    "data.num_validation_prompts=8",
    "validation.every_n_steps=2",
    "validation.num_samples_per_prompt=4",
    "validation.pass_k=[1,4]",
    "trainer.num_steps=3",
    "trainer.checkpoint_every_n_steps=2",
    "trainer.progress_bar=false",
    "cluster.ray_object_store_gb=0.5",  # a private Ray cluster of a test: a small object store
]


# vLLM's CPU attention takes head sizes 32, 64, ...: two heads of 32, and two KV heads so that TP=2 splits them
VLLM_TINY = [*TINY_OVERRIDES, "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",
             "model.tiny.num_attention_heads=2", "model.tiny.num_key_value_heads=2",
             "rollout.max_response_length=10", "rollout=vllm", "rollout.vllm.enforce_eager=true",
             "rollout.vllm.kv_cache_gb=0.25"]
# `make test` sets both, so in CI the vLLM tests run or fail; elsewhere they skip without an interpreter
VLLM_PYTHON = os.environ.get("PRORL_VLLM_PYTHON")
if not VLLM_PYTHON and os.environ.get("PRORL_REQUIRE_VLLM") == "1":
    raise RuntimeError("PRORL_REQUIRE_VLLM=1 but PRORL_VLLM_PYTHON is not set (make vllm-env)")


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A warm-started tiny model that vLLM's CPU build can run, built once per session."""
    from nemo_prorl.config import load_config
    from nemo_prorl.demo.warmstart import warm_started_model

    cfg, _ = load_config([*VLLM_TINY, f"model.warm_start.cache_dir={tmp_path_factory.mktemp('vllm_warmstart')}"])
    return warm_started_model(cfg)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A warm-started tiny model folder (safetensors, config.json, tokenizer), built once per session."""
    from nemo_prorl.config import load_config
    from nemo_prorl.demo.warmstart import warm_started_model

    cache = tmp_path_factory.mktemp("warmstart")
    cfg, _ = load_config([*TINY_OVERRIDES, f"model.warm_start.cache_dir={cache}"])
    return warm_started_model(cfg)


@pytest.fixture()
def tiny_cfg(tiny_model_dir: Path, tmp_path: Path):
    """(typed config, resolved DictConfig) for a few-step run on the tiny model, writing under tmp_path."""
    from nemo_prorl.config import load_config

    return load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", f"trainer.output_dir={tmp_path / 'run'}"])
