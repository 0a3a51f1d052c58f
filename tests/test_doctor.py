"""`prorl doctor`: each failure the issue names is injected on this CPU machine, and the doctor reports it as a
FAIL line with a fix and exits 1; a healthy embedded config passes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nemo_prorl import doctor, procs
from nemo_prorl.config.schema import ProRLConfig, SourceConfig
from tests.conftest import VLLM_PYTHON


def _run(capsys, overrides: list[str]) -> tuple[int, dict[str, list[str]]]:
    rc = doctor.main(overrides)
    out = capsys.readouterr().out
    lines: dict[str, list[str]] = {}
    last: list[str] = []
    for line in out.splitlines():
        if line[:4].strip() in (doctor.OK, doctor.WARN, doctor.FAIL):
            last = lines.setdefault(line[:4].strip(), [])
            last.append(line)
        elif line.startswith("      fix: ") and last:
            last[-1] += "\n" + line  # a finding's fix, on the line below it
    return rc, lines


def test_the_embedded_default_is_healthy(capsys, tmp_path):
    rc, lines = _run(capsys, [f"trainer.output_dir={tmp_path}/run"])
    assert rc == 0 and "FAIL" not in lines, lines
    names = " ".join(lines["OK"])
    for name in ("python", "torch", "gpus", "megatron-core", "ray", "sandbox", "/dev/shm", "checkpoints", "data",
                 "model"):
        assert name in names, name
    assert any("a test program ran end to end" in line for line in lines["OK"])


def test_the_cli_exits_1_naming_a_missing_vllm_environment(tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "nemo_prorl.cli", "doctor", "rollout=vllm",
                           f"rollout.vllm.python={missing}", f"trainer.output_dir={tmp_path}/run"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    fail = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1 and "vllm" in fail[0] and str(missing) in fail[0], proc.stdout
    assert "fix: build the vLLM environment" in proc.stdout


def test_a_broken_vllm_environment_is_a_fail(capsys, tmp_path):
    """An interpreter that exists but cannot import vLLM (the trainer's own here)."""
    rc, lines = _run(capsys, ["rollout=vllm", f"rollout.vllm.python={sys.executable}",
                              f"trainer.output_dir={tmp_path}/run"])
    assert rc == 1 and any("cannot import vLLM" in line for line in lines["FAIL"]), lines


def test_unreadable_and_malformed_data_files_are_named(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n{not json\n")
    missing = tmp_path / "missing.jsonl"
    rc, lines = _run(capsys, ["data=blend", f"+data.blend={{m:{{path:{bad},format:deepscaler}}}}",
                              f"+data.validation={{v:{{path:{missing},format:deepscaler}}}}",
                              f"trainer.output_dir={tmp_path}/run"])
    assert rc == 1, lines
    fails = "\n".join(lines["FAIL"])
    assert "data.blend.m" in fails and str(bad) in fails and "1 rejected" in fails, fails
    assert "data.validation.v" in fails and str(missing) in fails, fails


def test_a_model_folder_without_weights(capsys, tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        if not f.name.endswith(".safetensors"):
            (folder / f.name).write_bytes(f.read_bytes())
    rc, lines = _run(capsys, [f"model.path={folder}", f"trainer.output_dir={tmp_path}/run"])
    assert rc == 1 and any("model" in line and "no weights" in line for line in lines["FAIL"]), lines
    rc, lines = _run(capsys, [f"model.path={tiny_model_dir}", f"trainer.output_dir={tmp_path}/run"])
    assert rc == 0 and any("qwen2" in line and "tensors" in line for line in lines["OK"]), lines


def test_fp8_without_transformer_engine(capsys, tmp_path):
    """The config refuses it (named key) and the TE line says why, with the fix; the other checks still run."""
    pytest.importorskip("megatron.core")
    try:
        import transformer_engine.pytorch  # noqa: F401
        pytest.skip("Transformer Engine is installed here")
    except Exception:  # noqa: BLE001
        pass
    rc, lines = _run(capsys, ["policy=megatron", "policy.megatron.fp8=hybrid", f"trainer.output_dir={tmp_path}/run"])
    fails = "\n".join(lines["FAIL"])
    assert rc == 1 and "policy.megatron.fp8" in fails and "transformer_engine" in fails, fails
    assert any("sandbox" in line for line in lines["OK"])


def _code_config() -> ProRLConfig:
    cfg = ProRLConfig()
    cfg.data.source = "blend"
    cfg.data.blend = {"apps": SourceConfig(path="/data/apps.jsonl", domain="code")}
    return cfg


def test_no_namespaces_fails_the_sandbox_only_where_code_is_scored(monkeypatch):
    from nemo_prorl.confine import sandbox

    monkeypatch.setattr(sandbox, "_namespaces_available", lambda: False)
    [f] = doctor.code_sandbox(_code_config())
    assert f.status == doctor.FAIL and "namespaces NO" in f.detail and "allow_unconfined" in f.detail, f
    assert "backend=remote" in f.fix
    [f] = doctor.code_sandbox(ProRLConfig())  # no code source: a warning
    assert f.status == doctor.WARN, f


def test_a_check_that_breaks_is_a_finding_not_a_crash():
    def broken(cfg):
        raise RuntimeError("boom")

    [f] = doctor.run_checks(ProRLConfig(), [broken])
    assert f.status == doctor.FAIL and "boom" in f.detail and f.name == "broken"


needs_vllm = pytest.mark.skipif(not VLLM_PYTHON, reason="no vLLM interpreter (PRORL_VLLM_PYTHON; make vllm-env)")


@needs_vllm
def test_the_doctor_starts_a_vllm_engine_that_samples(capsys, tmp_path, vllm_model_dir):
    rc, lines = _run(capsys, ["rollout=vllm", f"rollout.vllm.python={VLLM_PYTHON}", f"model.path={vllm_model_dir}",
                              f"trainer.output_dir={tmp_path}/run"])
    assert rc == 0 and "FAIL" not in lines, lines
    [engine] = [line for line in lines["OK"] if "vllm engine" in line]
    tokens = int(engine.split(" tokens in ")[0].rsplit(" ", 1)[1])
    assert f"({Path(vllm_model_dir).name}, float32)" in engine and tokens > 0, engine


@needs_vllm
def test_an_engine_that_cannot_start_fails_with_vllms_reason_and_log(capsys, tmp_path, vllm_model_dir):
    """A setting only the engine refuses (more positions than the model has): the config and the import pass."""
    rc, lines = _run(capsys, ["rollout=vllm", f"rollout.vllm.python={VLLM_PYTHON}", f"model.path={vllm_model_dir}",
                              "rollout.vllm.max_model_len=100000", f"trainer.output_dir={tmp_path}/run"])
    fails = "\n".join(lines.get("FAIL", []))
    assert rc == 1 and "vllm engine" in fails and "did not start" in fails and "max_model_len" in fails, lines
    [log] = (tmp_path / "run" / "doctor").glob("vllm_engine-*.log")  # vLLM's whole output, named in the fix
    assert str(log) in fails and "Traceback" in log.read_text()
    assert not any("vllm engine" in line for line in lines.get("OK", []))


def _fake_vllm(monkeypatch, tmp_path: Path, body: str, cuda: bool = False) -> ProRLConfig:
    """An interpreter that 'imports vLLM' (the probe is stubbed) but runs `body` as the engine; the scratch
    folders go under tmp_path/tmp."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n" + body)
    fake.chmod(0o755)
    monkeypatch.setattr(doctor, "_probe_vllm", lambda py: ({"vllm": "0", "torch": "0", "transformers": "0",
                                                             "cuda": cuda}, ""))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    cfg = ProRLConfig()
    cfg.rollout.engine = "vllm"
    cfg.rollout.vllm.python = str(fake)
    cfg.model.warm_start.cache_dir = str(tmp_path / "cache")
    cfg.trainer.output_dir = str(tmp_path / "run")
    return cfg


def _live_in_group(pgid: int) -> list[int]:
    """Processes of process group `pgid` that are neither gone nor zombies (from /proc/<pid>/stat)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            live.append(int(stat.parent.name))
    return live


def test_an_engine_that_hangs_is_killed_with_its_children(monkeypatch, tmp_path):
    """A stuck engine and the worker it started: the doctor kills the engine's whole process group."""
    started: list[subprocess.Popen] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            started.append(self)

    monkeypatch.setattr(procs.subprocess, "Popen", Recorded)
    cfg = _fake_vllm(monkeypatch, tmp_path, "sleep 3600 &\nwait\n")
    cfg.rollout.vllm.startup_timeout_s = 1.0
    monkeypatch.setattr(doctor, "SAMPLE_ALLOWANCE_S", 0.0)
    [f] = doctor.vllm_engine(cfg)
    assert f.status == doctor.FAIL and "did not start" in f.detail and "ran past 1s" in f.detail, f
    [proc] = started
    for _ in range(200):  # SIGKILLed processes leave as soon as they are scheduled; a busy machine may lag
        if not _live_in_group(proc.pid):
            break
        time.sleep(0.05)
    assert not _live_in_group(proc.pid), "the engine's child outlived the doctor's timeout"


def test_a_doctor_told_to_stop_takes_the_engine_down_with_it(tmp_path):
    """SIGTERM (Slurm, `timeout`) to the doctor while its engine starts: the engine's whole group dies too,
    rather than holding a GPU."""
    group_file = tmp_path / "group"
    code = ("from nemo_prorl.procs import run_in_group; "
            f"run_in_group(['sh', '-c', 'echo $$ > {group_file}.tmp; mv {group_file}.tmp {group_file}; "
            "sleep 3600 & wait'], 3600)")
    doc = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(6000):  # until the engine has started (a busy machine may take long)
            if group_file.exists() or doc.poll() is not None:
                break
            time.sleep(0.05)
        group = int(group_file.read_text())
        doc.terminate()
        assert doc.wait(timeout=600) == 128 + 15
    finally:
        doc.kill()
    for _ in range(200):
        if not _live_in_group(group):
            break
        time.sleep(0.05)
    assert not _live_in_group(group), "the engine outlived the doctor"


def test_run_in_group_gives_back_the_signal_handlers_when_the_program_cannot_start():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(OSError):
        procs.run_in_group(["/nonexistent/python"], 1)
    assert signal.getsignal(signal.SIGTERM) is before
    assert procs.run_in_group(["sh", "-c", "echo out; echo err >&2; exit 3"], 600) == (3, "out\n", "err\n")


def test_an_engine_that_exits_without_sampling_is_a_fail_with_its_output_kept(monkeypatch, tmp_path):
    cfg = _fake_vllm(monkeypatch, tmp_path, "echo engine says hello\necho 'RuntimeError: no kernel image' >&2\n"
                     "echo 'RuntimeError: Engine core initialization failed. See root cause above.' >&2\nexit 1\n")
    [f] = doctor.vllm_engine(cfg)
    assert f.status == doctor.FAIL and "did not start" in f.detail and "exit code 1" in f.detail, f
    assert "RuntimeError: no kernel image" in f.detail and "initialization failed" not in f.detail, f
    [log] = (tmp_path / "run" / "doctor").glob("vllm_engine-*.log")
    assert str(log) in f.fix and "engine says hello" in log.read_text()
    # no model.path and no cached warm start: an untrained tiny model was built in a scratch folder, removed
    assert "tiny-qwen2-" in f.detail and not (tmp_path / "cache").exists()
    assert not list((tmp_path / "tmp").iterdir())


def test_an_engine_that_samples_then_crashes_at_exit_is_a_warning(monkeypatch, tmp_path):
    from nemo_prorl.rollout.vllm_server import SMOKE_MARK

    done = json.dumps({"start_s": 1.0, "generate_s": 0.1, "samples": 2, "tokens": 5, "slept": True,
                       "finite_logprobs": True})
    cfg = _fake_vllm(monkeypatch, tmp_path, f"echo '{SMOKE_MARK}{{\"start_s\": 1.0}}'\necho '{SMOKE_MARK}{done}'\n"
                     "kill -SEGV $$\n")
    [f] = doctor.vllm_engine(cfg)
    assert f.status == doctor.WARN and "5 tokens" in f.detail and "slept and woke" in f.detail, f
    assert "killed by SIGSEGV" in f.detail, f


def test_an_engine_over_several_gpus_is_started_like_the_trainers(monkeypatch, tmp_path):
    """The trainer's engine pool starts an engine over several GPUs (one actor, vLLM's TP workers), so the
    doctor starts it too (its spec asks for TP=2) instead of refusing it."""
    cfg = _fake_vllm(monkeypatch, tmp_path, f"echo \"$3\" > {tmp_path}/started\n", cuda=True)
    cfg.cluster.device, cfg.cluster.gpus_per_node = "cuda", 2
    cfg.rollout.vllm.tensor_parallel_size = 2
    [f] = doctor.vllm_engine(cfg)
    assert "not started" not in f.detail, f
    assert json.loads((tmp_path / "started").read_text())["tensor_parallel_size"] == 2


def test_no_engine_start_skips_only_the_engine(monkeypatch, tmp_path, capsys):
    from nemo_prorl.cli import main as cli_main

    cfg = _fake_vllm(monkeypatch, tmp_path, f"touch {tmp_path}/started\n")
    args = ["rollout=vllm", f"rollout.vllm.python={cfg.rollout.vllm.python}", f"trainer.output_dir={tmp_path}/run",
            f"model.warm_start.cache_dir={tmp_path}/cache"]
    assert cli_main(["doctor", "--no-engine-start", *args]) == 0
    out = capsys.readouterr().out
    assert "OK    vllm               vllm 0" in out and "vllm engine" not in out and not (tmp_path / "started").exists()
    cli_main(["doctor", *args])  # without the flag the engine starts (and, being a fake, fails)
    assert "FAIL  vllm engine" in capsys.readouterr().out and (tmp_path / "started").exists()
