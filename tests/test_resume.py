"""Prolonged runs survive: exact resume after SIGKILL, SIGTERM -> checkpoint and clean exit, refused
resumes (incompatible config, partial or corrupt checkpoint), a failed checkpoint write, and a run that
stops itself when its updates keep being skipped. The runs are real `prorl train` processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nemo_prorl.config.loader import load_config
from nemo_prorl.train import run_training
from nemo_prorl.trainer.checkpoint import CheckpointError, list_checkpoints
from nemo_prorl.trainer.grpo import TrainingHealthError
from tests.checks import assert_every_step_updated, assert_same_state, assert_weights_moved
from tests.conftest import TINY_OVERRIDES

NOISY = ("time/", "throughput/gen_tokens_per_s")


def _args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, f"model.path={model_dir}", f"trainer.output_dir={out}", "trainer.num_steps=4",
            "trainer.checkpoint_every_n_steps=1", "trainer.keep_last_checkpoints=10", "trainer.plot=false",
            "trainer.tensorboard=false", *extra]


def _start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, "-m", "nemo_prorl.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(NOISY)} for r in rows}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    ref = tmp_path / "ref"
    _finish(_start(_args(tiny_model_dir, ref)))
    expected = _rows(ref)
    assert sorted(expected) == [0, 1, 2, 3, 4]
    assert_every_step_updated(expected.values())

    run = tmp_path / "run"
    proc = _start(_args(tiny_model_dir, run))
    _wait_for(run / "checkpoints" / "step_000002" / "COMPLETE", proc)
    proc.send_signal(signal.SIGKILL)  # wherever step 3 happens to be
    proc.wait()
    resumed_from = int(list_checkpoints(run / "checkpoints")[-1].name.split("_")[1])
    assert resumed_from < 4
    _finish(_start(_args(tiny_model_dir, run, "resume=auto")))
    got = _rows(run)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == expected[step], step  # bit-for-bit: same losses, rewards, validation
    events = [json.loads(line) for line in open(run / "events.jsonl")]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [resumed_from]
    last = Path("checkpoints") / "step_000004"
    assert_weights_moved(ref / last, tiny_model_dir)
    assert_same_state(ref / last, run / last)  # weights, Adam moments and step counts, bit for bit


@pytest.mark.parametrize("backend", [(), ("policy=megatron", "policy.megatron.tensor_parallel_size=2")],
                         ids=["hf", "megatron-on-ray"])
def test_sigterm_checkpoints_exits_cleanly_and_resumes(tiny_model_dir, tmp_path, backend):
    """With Megatron, the ranks are Ray actors of a private cluster: they ignore the signal, so the trainer
    checkpoints with them before it stops them."""
    run = tmp_path / "run"
    base = _args(tiny_model_dir, run, *backend)
    args = [*base, "trainer.num_steps=50", "trainer.checkpoint_every_n_steps=100"]
    proc = _start(args)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _finish(proc, timeout=120)  # exit code 0: the sbatch script sees PREEMPTED and requeues
    marker = json.loads((run / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGTERM" and 1 <= marker["step"] < 50
    ckpts = list_checkpoints(run / "checkpoints")
    assert [c.name for c in ckpts] == [f"step_{marker['step']:06d}"]
    events = [json.loads(line) for line in open(run / "events.jsonl")]
    assert [e["event"] for e in events][-2:] == ["checkpoint", "preempted"]
    (run / "PREEMPTED").unlink()
    _finish(_start([*base, f"trainer.num_steps={marker['step'] + 1}", "trainer.checkpoint_every_n_steps=100",
                    "resume=auto"]))
    assert max(_rows(run)) == marker["step"] + 1


@pytest.fixture()
def checkpoint(tiny_model_dir, tmp_path) -> Path:
    cfg, resolved = load_config(_args(tiny_model_dir, tmp_path / "run", "trainer.num_steps=1",
                                      "validation.every_n_steps=0"))
    run_training(cfg, resolved)
    return list_checkpoints(tmp_path / "run" / "checkpoints")[-1]


def _resume(tiny_model_dir, tmp_path, ckpt, *extra):
    cfg, resolved = load_config(_args(tiny_model_dir, tmp_path / "again", f"resume={ckpt}", *extra))
    run_training(cfg, resolved)


def test_incompatible_resume_lists_the_differing_keys(tiny_model_dir, tmp_path, checkpoint):
    with pytest.raises(CheckpointError) as e:
        _resume(tiny_model_dir, tmp_path, checkpoint, "policy=megatron", "policy.megatron.tensor_parallel_size=2")
    msg = str(e.value)
    assert "policy.backend: checkpoint 'hf', now 'megatron'" in msg
    assert "policy.megatron.tensor_parallel_size: checkpoint 1, now 2" in msg
    other = tmp_path / "other_model"
    other.mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "hidden_size": cfg["hidden_size"] * 2}))
    with pytest.raises(CheckpointError, match="model hidden_size: checkpoint 32, now 64"):
        _resume(other, tmp_path, checkpoint)


def test_partial_or_corrupt_checkpoints_are_named(tiny_model_dir, tmp_path, checkpoint):
    state = checkpoint / "policy_state.pt"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"corrupt: policy_state.pt has \d+ bytes, the manifest says"):
        _resume(tiny_model_dir, tmp_path, checkpoint)
    (checkpoint / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="is partial"):
        _resume(tiny_model_dir, tmp_path, checkpoint)
    # resume=auto skips a partial checkpoint: with none complete left, the run starts fresh
    cfg, _ = load_config(_args(tiny_model_dir, checkpoint.parents[1], "resume=auto"))
    from nemo_prorl.train import resolve_resume

    assert resolve_resume(cfg) is None


def test_a_full_disk_fails_loudly_and_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from nemo_prorl.policy.hf import HFPolicy

    real_save, calls = HFPolicy.save, []

    def save(self, path):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint hits a full disk mid-write
            real_save(self, path)
            raise OSError(28, "No space left on device")
        return real_save(self, path)

    monkeypatch.setattr(HFPolicy, "save", save)
    out = tmp_path / "run"
    cfg, resolved = load_config(_args(tiny_model_dir, out, "trainer.num_steps=3", "validation.every_n_steps=0"))
    with pytest.raises(CheckpointError, match=r"step 2 could not be written(.|\n)*No space left(.|\n)*step_000001"):
        run_training(cfg, resolved)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000001"]  # no partial folder left


def test_repeated_skipped_updates_stop_the_run_with_a_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from nemo_prorl.trainer import grpo

    def nan_loss(*args, **kwargs):  # a diverged step: NaN loss, NaN gradients, so the update is skipped
        loss, metrics = real_loss(*args, **kwargs)
        return loss * float("nan"), metrics

    real_loss = grpo.microbatch_loss
    monkeypatch.setattr(grpo, "microbatch_loss", nan_loss)
    out = tmp_path / "run"
    cfg, resolved = load_config(_args(tiny_model_dir, out, "trainer.num_steps=20", "trainer.checkpoint_every_n_steps=100",
                                      "validation.every_n_steps=0", "trainer.max_consecutive_skipped_updates=2"))
    with pytest.raises(TrainingHealthError, match="2 steps in a row skipped their update"):
        run_training(cfg, resolved)
    rows = list(_rows(out).values())
    assert [r["actor/update_skipped"] for r in rows][-2:] == [1.0, 1.0]
    step = rows[-1]["step"]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step_{step:06d}"]
    events = [json.loads(line)["event"] for line in open(out / "events.jsonl")]
    assert events[-2:] == ["checkpoint", "stopped_unhealthy"]


def test_manual_reset_and_a_new_stage_reset_the_reference(tiny_model_dir, tmp_path, checkpoint, capsys):
    from nemo_prorl.cli import main

    run = checkpoint.parents[1]
    assert main(["reset-reference", str(run), "--no-reset-optimizer"]) == 0
    assert main(["reset-reference", str(tmp_path / "nowhere")]) == 2
    cfg, resolved = load_config(_args(tiny_model_dir, run, "resume=auto", "trainer.num_steps=2",
                                      "validation.every_n_steps=0", "stage_name=run2"))
    run_training(cfg, resolved)
    resets = [e for e in map(json.loads, open(run / "events.jsonl")) if e["event"] == "reference_reset"]
    # resuming into a new stage resets at its start; the request is served at the end of the next step
    assert [(e["step"], e["reason"].split(":")[0], e["reset_optimizer"]) for e in resets] == [
        (1, "stage run2 starts (was None)", cfg.algo.reference_reset.reset_optimizer), (2, "manual", False)]
    assert [e["num_resets"] for e in resets] == [1, 2]
    assert not (run / "RESET_REFERENCE").exists()


def test_staged_recipe_configs():
    cfg, _ = load_config(["+experiment=prorl_1p5b", "stage=run6"])
    assert cfg.stage_name == "run6" and cfg.algo.num_generations_per_prompt == 32
    assert cfg.data.blend["instruction_following"].enabled
    cfg, _ = load_config(["+experiment=prorl_1p5b", "stage=run8", "algo.num_generations_per_prompt=8"])
    assert cfg.rollout.max_response_length == 16384 and cfg.algo.num_generations_per_prompt == 8  # CLI wins
    cfg, _ = load_config(["+experiment=prorl_1p5b", "stage=run4"])
    assert cfg.reward.stop_properly.enabled and cfg.algo.num_generations_per_prompt == 16
    cfg, _ = load_config(["+experiment=prorl_1p5b", "stage=run1"])
    assert not cfg.data.blend["instruction_following"].enabled and not cfg.reward.stop_properly.enabled
    from nemo_prorl.config.loader import ConfigError

    with pytest.raises(ConfigError, match="(?s)stage/run9.*run1"):
        load_config(["stage=run9"])


def test_export_writes_a_loadable_hf_folder(tiny_model_dir, tmp_path, checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_prorl.cli import main

    out = tmp_path / "hf"
    assert main(["export", str(checkpoint.parents[1]), str(out)]) == 0  # a run folder: its latest checkpoint
    assert not any((out / f).exists() for f in ("policy_state.pt", "trainer_state.json", "COMPLETE"))
    model = AutoModelForCausalLM.from_pretrained(out)
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert AutoTokenizer.from_pretrained(out).eos_token == AutoTokenizer.from_pretrained(tiny_model_dir).eos_token
    assert main(["export", str(checkpoint), str(out)]) == 2  # never overwrites


def test_keep_last_and_keep_best_by_metric(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg, resolved = load_config(_args(tiny_model_dir, out, "trainer.num_steps=4", "trainer.keep_last_checkpoints=1",
                                      "validation.every_n_steps=1", "trainer.keep_best_metric=val/pass@1"))
    run_training(cfg, resolved)
    rows = _rows(out)
    best = max(range(1, 5), key=lambda s: (rows[s]["val/pass@1"], s))
    kept = sorted(int(p.name.split("_")[1]) for p in list_checkpoints(out / "checkpoints"))
    assert kept == sorted({best, 4})
    assert json.loads((out / "checkpoints" / f"step_{best:06d}" / "metrics.json").read_text())["val/pass@1"] == \
        rows[best]["val/pass@1"]


def test_pruning_keeps_the_last_k_and_the_best(tmp_path):
    from nemo_prorl.trainer.checkpoint import _prune, best_checkpoint

    for step, value in zip(range(1, 6), [0.5, 0.9, 0.1, 0.9, None]):
        d = tmp_path / f"step_{step:06d}"
        d.mkdir()
        (d / "COMPLETE").write_text(str(step))
        (d / "metrics.json").write_text(json.dumps({} if value is None else {"val/pass@1": value}))
    (tmp_path / "step_000009").mkdir()  # partial: never counted, never kept by pruning either
    assert best_checkpoint(tmp_path, "val/pass@1").name == "step_000004"  # ties go to the later one
    _prune(tmp_path, keep_last=2, keep_best_metric="val/pass@1")
    assert sorted(p.name for p in list_checkpoints(tmp_path)) == ["step_000004", "step_000005"]
    _prune(tmp_path, keep_last=1, keep_best_metric="val/pass@1")
    assert sorted(p.name for p in list_checkpoints(tmp_path)) == ["step_000004", "step_000005"]
    _prune(tmp_path, keep_last=1, keep_best_metric=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000005"]


def test_children_ignore_preemption_but_never_outlive_the_trainer():
    """Workers ignore SIGTERM (the trainer checkpoints first); a pool left open must still not keep the
    interpreter from exiting (multiprocessing would SIGTERM it and wait forever)."""
    code = ("import os, signal\n"
            "from nemo_prorl.confine.workers import HardTimeoutPool\n"
            "pool = HardTimeoutPool(1)\n"
            "assert pool.call(abs, -3, timeout=60).value == 3\n"
            "w = pool._idle.queue[0]\n"
            "os.kill(w.proc.pid, signal.SIGTERM)\n"
            "assert pool.call(abs, -4, timeout=60).value == 4  # the same worker, still serving\n"
            "print(w.proc.pid, flush=True)\n")  # exits without pool.close()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
