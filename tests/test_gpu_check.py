"""The prepared GPU check (benchmarks/gpu_check.sh, gpu_check.py): on this CPU machine it says there is no GPU
and exits 0 at once; its sections' logic runs on CPU with tiny shapes (--device cpu --quick), so that what
runs on a GPU machine for the first time has run before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.skipif(gpu_check.gpu_present(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "no CUDA GPU" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "no CUDA GPU" in proc.stdout, proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []  # no figures pretend a check ran


def test_the_rehearsal_runs_the_scripts_steps_on_cpu(tmp_path):
    """GPU_CHECK_ON_CPU=1 (make gpu-rehearsal) goes through gpu_check.sh past the GPU test, with tiny shapes."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, GPU_CHECK_ON_CPU="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--sections", "env"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "gpu_check: torch" in proc.stdout, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["quick"] is True and report["sections"]["env"]["status"] == "ok"


def test_the_sections_run_on_cpu_with_tiny_shapes(tmp_path):
    sections = "env,embedded,megatron_local,megatron_te,mfu_0p5b,weight_sync,moe,moe_te"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--sections", sections, "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=1200, cwd=ROOT)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    res = report["sections"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    te = {"megatron_te": res["megatron_te"]["status"], "moe_te": res["moe_te"]["status"]}
    assert [res[s]["status"] for s in sections.split(",")] == [te.get(s, "ok") for s in sections.split(",")]
    assert res["embedded"]["updates_taken"] >= 1
    assert res["megatron_te"]["status"] in ("ok", "skipped")  # skipped where Transformer Engine is absent
    assert res["megatron_local"]["train_tokens_per_s"] > 0 and res["megatron_local"]["grad_norm"] > 0
    assert res["mfu_0p5b"]["model_tflops"] > 0 and res["mfu_0p5b"]["mfu"] is None  # no GPU peak on CPU
    assert res["weight_sync"]["megabytes"] > 0 and res["weight_sync"]["x_floor"] > 0
    # a Qwen3-MoE rank trains with its experts one by one and with replayed routing
    assert res["moe"]["train_step_s"] > 0 and res["moe"]["replay_train_step_s"] > 0 and res["moe"]["grad_norm"] > 0
    assert res["moe_te"]["status"] in ("ok", "skipped")


def test_flops_per_token_of_the_0p5b_shape():
    """494M parameters without the embedding lookup (Qwen2.5-0.5B: 494M), 6 FLOPs each, plus attention."""
    assert gpu_check._flops_per_token(gpu_check.QWEN2_0P5B, 1000) == 6 * 493_961_216 + 6 * 24 * 896 * 1000
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.4 and gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200 NVL") == 835.0 and gpu_check.peak_tflops("NVIDIA L40") == 181.0


def test_the_model_folders_are_removed_at_exit(tmp_path):
    """Each section's model folder (prorl-gpu-check-*, 1.4 MB on CPU) goes when the check's process exits."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gpu_check\n"
            "d = gpu_check._model_dir(dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
            " num_attention_heads=2, num_key_value_heads=1), 'float32')\n"
            "assert (d / 'config.json').is_file(); print(d)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks")], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    folder = Path(proc.stdout.split()[-1])
    assert folder.parent == tmp_path and not folder.exists()  # made under TMPDIR, gone after exit
