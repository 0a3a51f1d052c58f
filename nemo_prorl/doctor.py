"""`prorl doctor [OVERRIDES]`: check this machine against what the resolved config needs, before a
multi-hour job starts on it. One line per check: OK, WARN (works, but slower or less safe than it could)
or FAIL (the run would fail or be wrong), with the fix. Exit status 1 when a check the config needs
fails. The Slurm launchers run it on every node before training and stop the job with its output.

Each check is a function of the config in `CHECKS`; it reports what it finds and decides from the config
whether a problem is a FAIL (needed) or a WARN (not needed by this run).
"""

from __future__ import annotations

import copy
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.procs import run_in_group

OK, WARN, FAIL = "OK", "WARN", "FAIL"
# Transformer Engine's FP8 needs Ada/Hopper/Blackwell tensor cores: compute capability 8.9 or newer.
FP8_MIN_CAPABILITY = (8, 9)
MEGATRON_SERIES = "0.16."  # pyproject.toml pins megatron-core 0.16.x (0.17+ need Python 3.12)
SHM_MIN_GB = 1.0  # Ray's object store and NCCL live in /dev/shm; Docker's default is 64 MB
DISK_MIN_GB = 20.0
SAMPLE_ALLOWANCE_S = 60.0  # the doctor's engine: time to sample, beyond rollout.vllm.startup_timeout_s


@dataclass
class Finding:
    status: str
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4}  {self.name:<18} {self.detail}" + (f"\n      fix: {self.fix}" if self.fix else "")


Check = Callable[[ProRLConfig], list[Finding]]
CHECKS: list[Check] = []


def check(fn: Check) -> Check:
    CHECKS.append(fn)
    return fn


def _needed(needed: bool) -> str:
    return FAIL if needed else WARN


def _cuda(cfg: ProRLConfig) -> bool:
    return cfg.cluster.device == "cuda"


def _megatron(cfg: ProRLConfig) -> bool:
    return cfg.policy.backend == "megatron"


def _uses_ray(cfg: ProRLConfig) -> bool:
    return _megatron(cfg) or cfg.rollout.engine == "vllm" or (cfg.rollout.num_engines or 1) > 1 \
        or cfg.cluster.ray_address is not None


def _sources(cfg: ProRLConfig) -> list[tuple[str, Any]]:
    if cfg.data.source != "blend":
        return []
    return [(f"data.blend.{k}", s) for k, s in cfg.data.blend.items()] + \
        [(f"data.validation.{k}", s) for k, s in cfg.data.validation.items()]


def _uses_code(cfg: ProRLConfig) -> bool:
    return any(s.enabled and ("code" in (s.domain, s.reward) or s.format == "eurus_code") for _, s in _sources(cfg))


@check
def python_version(cfg: ProRLConfig) -> list[Finding]:
    v = sys.version_info
    ok = v >= (3, 10)
    return [Finding(OK if ok else FAIL, "python", f"{sys.version.split()[0]} ({sys.executable})",
                    "" if ok else "Python 3.10 or newer (the container's is 3.12)")]


@check
def torch_and_gpus(cfg: ProRLConfig) -> list[Finding]:
    import torch

    out = [Finding(OK, "torch", f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}")]
    if not torch.cuda.is_available():
        out.append(Finding(FAIL if _cuda(cfg) else OK, "gpus", "none visible",
                           "check CUDA_VISIBLE_DEVICES, the driver (nvidia-smi) and the container's --gpus/--container-"
                           "image flags" if _cuda(cfg) else ""))
        return out
    n = torch.cuda.device_count()
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(n)})
    names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
    want = cfg.cluster.gpus_per_node if _cuda(cfg) else 0
    for i in range(n):  # visible is not usable: a GPU in a bad state fails its first allocation
        try:
            torch.ones(1, device=f"cuda:{i}").add_(1).item()
        except Exception as e:  # noqa: BLE001
            out.append(Finding(FAIL if _cuda(cfg) else WARN, "gpus", f"cuda:{i} is visible but fails a computation: "
                               f"{type(e).__name__}: {e}", "nvidia-smi on this node; drain it if it is faulty"))
            return out
    out.append(Finding(OK if n >= want else FAIL, "gpus",
                       f"{n} x {', '.join(names)}, compute capability {', '.join(f'{a}.{b}' for a, b in caps)}",
                       "" if n >= want else f"cluster.gpus_per_node={want} but {n} visible"))
    try:
        v = torch.cuda.nccl.version()
        out.append(Finding(OK, "nccl", ".".join(map(str, v)) if isinstance(v, tuple) else str(v)))
    except Exception as e:  # noqa: BLE001  reported
        out.append(Finding(_needed(n > 1 or cfg.cluster.num_nodes > 1), "nccl", f"unavailable: {e}",
                           "a torch build with NCCL (the NGC container's)"))
    return out


@check
def transformer_engine(cfg: ProRLConfig) -> list[Finding]:
    m = cfg.policy.megatron
    wants_te = _megatron(cfg) and (m.fp8 is not None or m.transformer_impl == "transformer_engine")
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001  any import failure (a TE built against another torch raises OSError)
        status = FAIL if wants_te else (WARN if _cuda(cfg) and _megatron(cfg) else OK)
        why = "policy.megatron.fp8 is set" if m.fp8 else "policy.megatron.transformer_impl=transformer_engine"
        return [Finding(status, "transformer_engine", f"not importable ({type(e).__name__}: {str(e)[:120]})",
                        f"{why}: use the project's container (NGC's Transformer Engine) or unset it" if wants_te
                        else ("the local layer spec is used: slower than TE's fused kernels" if status == WARN else ""))]
    out = [Finding(OK, "transformer_engine", getattr(transformer_engine, "__version__", "importable"))]
    if m.fp8 is not None and _megatron(cfg):
        import torch

        caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
        ok = bool(caps) and min(caps) >= FP8_MIN_CAPABILITY
        out.append(Finding(OK if ok else FAIL, "fp8", f"policy.megatron.fp8={m.fp8}, GPUs' compute capability "
                           f"{', '.join(f'{a}.{b}' for a, b in caps) or 'none'}",
                           "" if ok else "FP8 needs compute capability 8.9+ (Ada, Hopper, Blackwell); unset "
                           "policy.megatron.fp8"))
    return out


@check
def megatron_core(cfg: ProRLConfig) -> list[Finding]:
    try:
        import megatron.core
        from megatron.core.models.gpt import GPTModel  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return [Finding(_needed(_megatron(cfg)), "megatron-core", f"not importable ({type(e).__name__}: {e})",
                        "pip install -e '.[megatron]' (megatron-core 0.16.x)")]
    v = getattr(megatron.core, "__version__", "?")
    out = [Finding(OK if v.startswith(MEGATRON_SERIES) else WARN, "megatron-core", v,
                   "" if v.startswith(MEGATRON_SERIES) else f"tested with {MEGATRON_SERIES}x")]
    if _cuda(cfg) and _megatron(cfg):
        try:
            from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl  # noqa: F401
            out.append(Finding(OK, "megatron fusions", "CUDA fusions import"))
        except Exception as e:  # noqa: BLE001
            out.append(Finding(WARN, "megatron fusions", f"{type(e).__name__}: {e}", "slower unfused kernels"))
    try:
        import apex  # noqa: F401
        from apex.normalization import FusedLayerNorm  # noqa: F401
        out.append(Finding(OK, "apex", "fused kernels import"))
    except Exception as e:  # noqa: BLE001
        out.append(Finding(WARN if _cuda(cfg) and _megatron(cfg) else OK, "apex",
                           f"not importable ({type(e).__name__})" + ("" if _cuda(cfg) else ": not used on CPU")))
    return out


# `from vllm import LLM` imports what the engine needs (transformers' processors, torchvision if present)
_VLLM_PROBE = ("import json, torch, transformers, vllm; from vllm import LLM; "
               "print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__, "
               "'transformers': transformers.__version__, 'cuda': torch.cuda.is_available()}))")


@functools.lru_cache(maxsize=4)
def _probe_vllm(py: str) -> tuple[Optional[dict[str, Any]], str]:
    """(versions, "") when `py` imports vLLM, else (None, why). Cached: two checks ask, the import is slow."""
    if not (os.path.isfile(py) and os.access(py, os.X_OK)):
        return None, "missing"
    try:
        rc, out, err = run_in_group([py, "-c", _VLLM_PROBE], 600)
        if rc == 0:
            return json.loads(out.strip().splitlines()[-1]), ""
    except (OSError, ValueError, IndexError) as e:
        return None, f"{type(e).__name__}: {e}"
    if rc is None:
        return None, "no answer in 600s"
    return None, (err.strip().splitlines() or [""])[-1] + f" ({_exit(rc)})"


@check
def vllm_environment(cfg: ProRLConfig) -> list[Finding]:
    from nemo_prorl.rollout.vllm_engine import engine_python

    if cfg.rollout.engine != "vllm":
        return [Finding(OK, "vllm", f"not used (rollout.engine={cfg.rollout.engine})")]
    py = engine_python(cfg)
    info, err = _probe_vllm(py)
    if err == "missing":
        return [Finding(FAIL, "vllm", f"interpreter {py} does not exist",
                        "build the vLLM environment (make vllm-env; in the container /opt/vllm-env) and set "
                        "rollout.vllm.python or PRORL_VLLM_PYTHON to its python")]
    if info is None:
        return [Finding(FAIL, "vllm", f"{py} cannot import vLLM: {err[:200]}",
                        "rebuild the vLLM environment (make vllm-env, or the container's install script)")]
    gpu = info["cuda"] or not _cuda(cfg)
    return [Finding(OK if gpu else FAIL, "vllm", f"vllm {info['vllm']}, torch {info['torch']}, transformers "
                    f"{info['transformers']} ({py})", "" if gpu else "the vLLM environment's torch sees no GPU")]


def _engine_model(cfg: ProRLConfig, scratch: Path) -> Optional[Path]:
    """The run's model folder; the cached warm-started tiny model; or, when neither exists yet, an untrained
    tiny model built in `scratch` (the engine's start is checked, not the model's quality). None when
    model.path is not a model folder (the model line says so)."""
    if cfg.model.path:
        d = Path(cfg.model.path).expanduser()
        return d if (d / "config.json").is_file() else None
    from nemo_prorl.demo.warmstart import cache_key, warm_started_model

    cached = Path(os.path.expanduser(cfg.model.warm_start.cache_dir)) / f"tiny-qwen2-{cache_key(cfg)}"
    if (cached / "model.safetensors").is_file():
        return cached
    tiny = copy.deepcopy(cfg)
    tiny.model.warm_start.enabled, tiny.model.warm_start.cache_dir = False, str(scratch)
    return warm_started_model(tiny)


@check
def vllm_engine(cfg: ProRLConfig) -> list[Finding]:
    """Start one engine as the trainer's actors do (its spec, environment and worker extension; no Ray) and
    sample a few tokens: a CUDA, driver or model mismatch shows here, not an hour into a job."""
    from nemo_prorl import cluster
    from nemo_prorl.rollout import vllm_engine as ve
    from nemo_prorl.rollout.pool import plan_problems

    info = _probe_vllm(ve.engine_python(cfg))[0] if cfg.rollout.engine == "vllm" else None
    if info is None or (_cuda(cfg) and not info["cuda"]):
        return []  # not used, or the vllm line above already fails
    problems = plan_problems(cluster.plan_from_config(cfg, engine="vllm"))
    if problems:
        return [Finding(FAIL, "vllm engine", f"not started: {problems[0][2]}", "see rollout.* and cluster.*")]
    with tempfile.TemporaryDirectory(prefix="prorl-doctor-") as scratch:
        model = _engine_model(cfg, Path(scratch))
        if model is None:
            return []
        shutil.copy(Path(ve.__file__).with_name("vllm_server.py"), Path(scratch) / f"{ve._MODULE}.py")
        (Path(scratch) / "tmp").mkdir()  # vLLM's temporary files (engine_env), removed with the scratch folder
        spec = ve.engine_spec(cfg, model)
        code = f"import json, sys; from {ve._MODULE} import smoke; smoke(json.loads(sys.argv[1]))"
        env = {**os.environ, **ve.engine_env(cfg, Path(scratch))}
        limit = cfg.rollout.vllm.startup_timeout_s + SAMPLE_ALLOWANCE_S
        print(f"....  vllm engine        starting ({model.name}; at most {limit:g}s)", flush=True)
        rc, out, err = run_in_group([ve.engine_python(cfg), "-c", code, json.dumps(spec)], limit, env=env, cwd=scratch)
    return [_engine_finding(cfg, model.name, spec, rc, out, err, limit)]


def _engine_finding(cfg: ProRLConfig, model: str, spec: dict[str, Any], rc: Optional[int], out: str, err: str,
                    limit: float) -> Finding:
    from nemo_prorl.rollout.vllm_server import SMOKE_MARK

    marks = [json.loads(line[len(SMOKE_MARK):]) for line in out.splitlines() if line.startswith(SMOKE_MARK)]
    where = f"{model}, {spec['dtype']}" + (", cuda:0" if _cuda(cfg) else "")
    end = "ran past {:g}s (rollout.vllm.startup_timeout_s + {:g}s)".format(limit, SAMPLE_ALLOWANCE_S) \
        if rc is None else _exit(rc)
    if marks and "tokens" in marks[-1]:
        fig = marks[-1]
        good = fig["tokens"] > 0 and fig["finite_logprobs"]
        detail = (f"started in {fig['start_s']}s ({where}), {'slept and woke, ' if fig['slept'] else ''}"
                  f"{fig['samples']} samples, {fig['tokens']} tokens in {fig['generate_s']}s")
        if not good:
            return Finding(FAIL, "vllm engine", detail, "the engine sampled no tokens or log-probabilities that "
                           f"are not finite; {_keep_log(cfg, out, err)}")
        if rc != 0:
            return Finding(WARN, "vllm engine", f"{detail}; then {end}", _keep_log(cfg, out, err))
        return Finding(OK, "vllm engine", detail)
    what = f"started in {marks[-1]['start_s']}s but did not sample" if marks else "did not start"
    return Finding(FAIL, "vllm engine", f"{what} ({where}): {end}: {_reason(err)}",
                   f"{_keep_log(cfg, out, err)}; the engine's settings are rollout.vllm.* (prorl config)")


def _exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


_EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?[\w.]*(?:Error|Exception)\b.*")


def _reason(err: str, n: int = 3) -> str:
    """The last exception line of vLLM's output and the (at most n - 1) lines after it: its message may
    span them. The generic 'Engine core initialization failed' is passed over (with TP the root cause comes
    before it). Without an exception line, the last n lines."""
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line) and "initialization failed" not in line]
    if not starts:
        return " | ".join(lines[-n:])[:500] or "no output"
    picked = lines[starts[-1]:starts[-1] + 1]
    for line in lines[starts[-1] + 1:starts[-1] + n]:
        if _EXCEPTION_LINE.match(line):  # the next exception: not this one's message
            break
        picked.append(line)
    return " | ".join(picked)[:500]


def _keep_log(cfg: ProRLConfig, out: str, err: str) -> str:
    """vLLM's whole output, kept in the run's folder (shared storage on a cluster: readable after the job)
    under a fresh name per node and attempt; in /tmp when that folder cannot be written."""
    text = f"{out}\n--- stderr ---\n{err}"
    for folder in (Path(cfg.trainer.output_dir) / "doctor", None):
        try:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix=f"vllm_engine-{socket.gethostname()}-", suffix=".log",
                                        dir=folder)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return f"vLLM's output: {path}"
        except OSError:
            continue
    return "vLLM's output could not be saved"


@check
def ray_runtime(cfg: ProRLConfig) -> list[Finding]:
    needed = _uses_ray(cfg)
    try:
        import ray
    except Exception as e:  # noqa: BLE001
        return [Finding(_needed(needed), "ray", f"not importable ({e})", "pip install -e . (ray is a dependency)")]
    if cfg.cluster.ray_address is None:
        how = "a private cluster on loopback with a fresh token per run" if needed else "not used by this run"
        return [Finding(OK, "ray", f"{ray.__version__}: {how}")]
    path = cfg.cluster.ray_token_file or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not path or not os.path.isfile(path):
        return [Finding(FAIL, "ray", f"{ray.__version__}: cluster.ray_address set but no token file ({path})",
                        "set cluster.ray_token_file or RAY_AUTH_TOKEN_PATH (the launchers write one per job)")]
    st = os.stat(path)
    private = not st.st_mode & 0o077 and st.st_uid == os.getuid()
    return [Finding(OK if private else FAIL, "ray", f"{ray.__version__}: token auth, token file {path}",
                    "" if private else f"chmod 600 {path} (yours alone)")]


@check
def code_sandbox(cfg: ProRLConfig) -> list[Finding]:
    from nemo_prorl.confine.sandbox import LocalSandbox, UnconfinedError, _namespaces_available

    needed = _uses_code(cfg)
    sb_cfg = cfg.reward.sandbox
    if sb_cfg.backend == "remote":
        return [Finding(OK, "sandbox", f"remote at {sb_cfg.url} (checked by the server's own doctor)")]
    ns = _namespaces_available()
    cgroup = Path("/sys/fs/cgroup/cgroup.controllers").is_file() and os.access("/sys/fs/cgroup", os.W_OK)
    base = (f"namespaces {'yes' if ns else 'NO'}, seccomp filter, cgroup v2 "
            f"{'writable' if cgroup else 'not delegated (the runner enforces the budget)'}")
    try:
        sb = LocalSandbox(sb_cfg)
        run = sb.run("print(sum(map(int, input().split())))", ["2 3\n"])
    except UnconfinedError as e:
        return [Finding(_needed(needed), "sandbox", f"{base}: {e}",
                        "allow user namespaces (docker: --security-opt seccomp=unconfined; or the enroot/pyxis "
                        "container), or reward.sandbox.backend=remote")]
    ok = run.error == "" and [t.stdout for t in run.tests] == ["5\n"]
    detail = f"{base}; a test program ran end to end" if ok else f"{base}; a test program failed: " \
        f"{run.error or [(t.status, t.stderr[-200:]) for t in run.tests]}"
    return [Finding(OK if ok else _needed(needed), "sandbox", detail, "" if ok else "see the error above")]


@check
def shared_memory(cfg: ProRLConfig) -> list[Finding]:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return [Finding(_needed(_uses_ray(cfg)), "/dev/shm", "missing", "mount a tmpfs at /dev/shm")]
    gb = st.f_blocks * st.f_frsize / 2**30
    ok = gb >= max(SHM_MIN_GB, cfg.cluster.ray_object_store_gb if _uses_ray(cfg) else 0.0)
    return [Finding(OK if ok else WARN, "/dev/shm", f"{gb:.1f} GB",
                    "" if ok else "docker run --shm-size=16g (Ray's object store and NCCL use it; else /tmp, slower)")]


def _existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@check
def checkpoint_disk(cfg: ProRLConfig) -> list[Finding]:
    out_dir = Path(cfg.trainer.output_dir)
    base = _existing_parent(out_dir)
    if not os.access(base, os.W_OK):
        return [Finding(FAIL, "checkpoints", f"{out_dir}: {base} is not writable",
                        "trainer.output_dir on a writable (shared) file system")]
    free = shutil.disk_usage(base).free / 2**30
    need = DISK_MIN_GB if cfg.model.path else 0.1
    return [Finding(OK if free >= need else WARN, "checkpoints", f"{out_dir}: {free:.1f} GB free",
                    "" if free >= need else f"less than {need:g} GB: checkpoints may not fit")]


@check
def data_files(cfg: ProRLConfig) -> list[Finding]:
    from nemo_prorl.data.inspect import inspect_file
    from nemo_prorl.data.readers import DataError

    out = []
    for key, s in _sources(cfg):
        if not s.enabled or not s.path:
            continue
        try:
            rep = inspect_file(s.path, s.format, s.domain, data=cfg.data)
        except (DataError, OSError) as e:
            out.append(Finding(FAIL, "data", f"{key}: {e}", f"fix or replace {s.path}"))
            continue
        good = sum(rep.domains.values())
        bad = len(rep.rejects)
        domains = ", ".join(f"{d} {n}" for d, n in sorted(rep.domains.items()))
        status = OK if not bad else (WARN if cfg.data.on_bad_row == "skip" and good else FAIL)
        out.append(Finding(status, "data", f"{key}: {s.path}: {rep.rows} rows ({domains})"
                           + (f", {bad} rejected, first: {rep.rejects[0]}" if bad else ""),
                           "" if not bad else f"prorl data inspect {s.path}; or data.on_bad_row=skip"))
    if not out:
        out.append(Finding(OK, "data", f"data.source={cfg.data.source}: no files to read"))
    return out


@check
def trackers(cfg: ProRLConfig) -> list[Finding]:
    """logger.wandb, logger.mlflow: package, W&B mode, credentials and server, MLflow server or local store
    (trainer/trackers.py). A dashboard that cannot be reached is a WARN: the run goes on without it."""
    from nemo_prorl.trainer.tracker_checks import tracker_findings

    return [Finding(*f) for f in tracker_findings(cfg)]


@check
def model_folder(cfg: ProRLConfig) -> list[Finding]:
    if not cfg.model.path:
        return [Finding(OK, "model", "the tiny model, built at launch (model.path unset)")]
    d = Path(cfg.model.path)
    if not d.is_dir():
        return [Finding(FAIL, "model", f"model.path={d} is not a folder", "a Hugging Face model folder")]
    weights = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
    missing = [n for n in ("config.json",) if not (d / n).is_file()]
    tokenizer = any((d / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    if missing or not weights or not tokenizer:
        what = missing + ([] if weights else ["weights (*.safetensors)"]) + ([] if tokenizer else ["a tokenizer"])
        return [Finding(FAIL, "model", f"{d}: no {', '.join(what)}", "copy the whole Hugging Face folder")]
    try:
        from safetensors import safe_open
        from transformers import AutoConfig

        conf = AutoConfig.from_pretrained(d)
        tensors = 0
        for w in weights:
            if w.suffix == ".safetensors":
                with safe_open(str(w), "pt") as f:  # the header only: no tensor is read
                    tensors += len(list(f.keys()))
    except Exception as e:  # noqa: BLE001
        return [Finding(FAIL, "model", f"{d}: cannot be read: {type(e).__name__}: {e}", "re-copy the folder")]
    return [Finding(OK, "model", f"{d}: {conf.model_type}, {len(weights)} weight file(s), {tensors} tensors")]


# Their INFO lines would land between the doctor's (the CLI's root logger shows INFO): megatron-core 0.16's
# FSDP module announces "Detected Megatron Core ..." three times when megatron.core is imported.
QUIET_LOGGERS = ("megatron", "mlflow", "wandb")


@contextlib.contextmanager
def _quiet_loggers() -> Any:
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_checks(cfg: ProRLConfig, checks: Sequence[Check] = (),
               emit: Optional[Callable[[Finding], None]] = None) -> list[Finding]:
    """Every finding of `checks` (all by default); `emit` sees each as it comes (a killed doctor has
    printed what it found so far)."""
    out: list[Finding] = []
    with warnings.catch_warnings(), _quiet_loggers():  # libraries' import-time notices: the lines say it
        warnings.simplefilter("ignore")
        for fn in checks or CHECKS:
            try:
                found = fn(cfg)
            except Exception as e:  # noqa: BLE001  a broken check is a finding, not a crash of the doctor
                found = [Finding(FAIL, fn.__name__, f"the check itself failed: {type(e).__name__}: {e}")]
            for f in found:
                if emit is not None:
                    emit(f)
                out.append(f)
    return out


def _config(overrides: Sequence[str]) -> tuple[Optional[ProRLConfig], list[Finding]]:
    """The validated config; or, when validation refuses it, the unvalidated one (so that the other checks
    still run) and the refusal as a finding."""
    from omegaconf import OmegaConf

    from nemo_prorl.config.loader import ConfigError, compose_config, load_config

    try:
        return load_config(overrides)[0], [Finding(OK, "config", "resolved and valid")]
    except ConfigError as e:
        finding = Finding(FAIL, "config", str(e).replace("\n", " "), "fix the override named above")
    try:
        typed = OmegaConf.to_object(compose_config(overrides))
        return (typed if isinstance(typed, ProRLConfig) else None), [finding]
    except Exception:  # noqa: BLE001  a misspelt key: nothing to check against
        return None, [finding]


def main(overrides: Sequence[str], start_engine: bool = True) -> int:
    cfg, findings = _config(overrides)
    for f in findings:
        print(f.line(), flush=True)
    checks = [c for c in CHECKS if start_engine or c is not vllm_engine]
    findings += run_checks(cfg if cfg is not None else ProRLConfig(), checks,
                           emit=lambda f: print(f.line(), flush=True))
    failed = [f for f in findings if f.status == FAIL]
    print(f"prorl doctor: {len(findings)} checks, {len(failed)} failed, "
          f"{sum(f.status == WARN for f in findings)} warnings")
    return 1 if failed else 0
