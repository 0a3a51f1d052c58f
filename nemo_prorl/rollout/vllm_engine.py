"""rollout.engine=vllm: generation in vLLM, as Ray actors (see vllm_server.py and pool.py).

The trainer side imports no vLLM: the engine actor is placed by the cluster plan (nemo_prorl/cluster) and
started with the configured interpreter (`rollout.vllm.python`: the CPU build's `.venv-vllm` here, the
container's vLLM environment on GPU), and weights pass through a transfer buffer that both processes map
(shared memory; CUDA IPC on GPU). A failing or dead engine raises `VLLMEngineError` naming the engine,
its node and the command, with the traceback or Ray's reason and the tail of the engine's log
(`<output_dir>/vllm_engine.log`, `vllm_engine_<i>.log` for engine i > 0)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from nemo_prorl import cluster
from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.rollout.base import ROLLOUT_ENGINES, RolloutEngine
from nemo_prorl.rollout.pool import EnginePool, EngineSetup, RolloutEngineError
from nemo_prorl.rollout.vllm_server import TMP_ENV
from nemo_prorl.torch_utils import DTYPES

log = logging.getLogger(__name__)

_MODULE = "prorl_vllm_server"


class VLLMEngineError(RolloutEngineError):
    pass


def _server_module(folder: Path) -> Any:
    """vllm_server.py as the top-level module `prorl_vllm_server` from `folder` (the name under which the
    engine's environment imports it, and under which Ray refers to its actor class)."""
    shutil.copy(Path(__file__).with_name("vllm_server.py"), folder / f"{_MODULE}.py")
    spec = importlib.util.spec_from_file_location(_MODULE, folder / f"{_MODULE}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[_MODULE] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def check_interpreter(python: str) -> None:
    """The engine's interpreter must start and run this Python and this Ray (its worker joins our cluster):
    said here, naming the interpreter, where Ray would retry starting the worker until the start-up timeout."""
    import subprocess

    import ray

    probe = "import sys, ray; print('%d.%d' % sys.version_info[:2], ray.__version__)"
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VLLMEngineError(f"rollout.vllm.python={python!r} cannot be started: {e}", role="vllm engine") from None
    want = f"{sys.version_info.major}.{sys.version_info.minor} {ray.__version__}"
    if out.returncode != 0 or out.stdout.strip() != want:
        why = out.stderr.strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        raise VLLMEngineError(f"rollout.vllm.python={python!r} must run Python and Ray as the trainer does "
                              f"({want}); it gave {out.stdout.strip() or why[0]!r}", role="vllm engine")


class VLLMRolloutEngine(EnginePool):
    """`rollout.num_engines` vLLM engine actors (rollout/pool.py), each started with `python` (vLLM's own
    environment) and logging to `<output_dir>/vllm_engine[_i].log`."""

    def __init__(self, cfg: ProRLConfig, spec: dict[str, Any], *, python: str, log_path: Path) -> None:
        check_interpreter(python)
        folder = Path(tempfile.mkdtemp(prefix="prorl-vllm-"))
        try:
            server = _server_module(folder)
            (folder / "tmp").mkdir(mode=0o700)  # vLLM's temporary files (engine_env), apart from the module
            num = len(cluster.plan_from_config(cfg, engine="vllm").engines)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.python = python
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        logs = [log_path if i == 0 else log_path.with_name(f"{log_path.stem}_{i}{log_path.suffix}") for i in range(num)]
        env = engine_env(cfg, folder)
        v = cfg.rollout.vllm
        setup = EngineSetup("vllm engine", server.EngineServer, spec, DTYPES[spec["dtype"]], logs, env=env,
                            runtime_env={"py_executable": python}, startup_timeout_s=v.startup_timeout_s,
                            request_timeout_s=v.request_timeout_s, error_type=VLLMEngineError,
                            on_close=lambda: shutil.rmtree(folder, ignore_errors=True))
        super().__init__(cfg, setup, engine="vllm")
        self.pid = self.group.call_all("node_info", timeout_s=60)[0]["pid"]


def _model_max_len(model_dir: Path) -> Optional[int]:
    try:
        return json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None


def engine_env(cfg: ProRLConfig, folder: Path) -> dict[str, str]:
    """The engine process's environment additions: `folder` (holding `prorl_vllm_server.py`) on PYTHONPATH, and
    its tmp/ as the home of vLLM's temporary files."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p),
           "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
           TMP_ENV: str(folder / "tmp")}  # vLLM's temporary files, removed with the folder (vllm_server._use_private_tmp)
    if cfg.rollout.vllm.batch_invariant and cfg.cluster.device.startswith("cuda"):
        env["VLLM_BATCH_INVARIANT"] = "1"  # vLLM's batch-invariant kernels exist on CUDA only
    if cfg.rollout.routing_replay and cfg.cluster.device.startswith("cuda"):
        env["VLLM_USE_V2_MODEL_RUNNER"] = "1"  # vLLM's routed-experts output exists on its V2 runner only
    return env


def engine_python(cfg: ProRLConfig) -> str:
    return cfg.rollout.vllm.python or os.environ.get("PRORL_VLLM_PYTHON") or sys.executable


def engine_spec(cfg: ProRLConfig, model_dir: Path) -> dict[str, Any]:
    """What `EngineServer.init` builds its `vllm.LLM` from (the trainer's engines and `prorl doctor` alike)."""
    v = cfg.rollout.vllm
    on_gpu = cfg.cluster.device.startswith("cuda")
    max_len = v.max_model_len or cfg.data.max_prompt_length + cfg.rollout.max_response_length
    model_max = _model_max_len(Path(model_dir))
    if v.max_model_len is None and model_max:
        max_len = min(max_len, model_max)  # vLLM refuses more positions than the model was built for
    kv_gb = v.kv_cache_gb if v.kv_cache_gb is not None else (None if on_gpu else 1.0)
    # Routing replay: vLLM's own routed-experts output where it has one (its V2 model runner, GPU; it
    # keeps the routing of cached prefixes, and requires prefix caching on), a capture hook in the CPU
    # build (vllm_server.RoutingRecorder; prefix caching off, since cached tokens are never computed, and
    # eager mode: the CPU build compiles the forward with one Dynamo trace that would freeze the hook's
    # Python side, its batch layout included, at trace time)
    routing = ("official" if on_gpu else "hook") if cfg.rollout.routing_replay else None
    prefix_caching = True if routing == "official" else (False if routing == "hook" else v.enable_prefix_caching)
    eager = v.enforce_eager or routing == "hook"
    if prefix_caching != v.enable_prefix_caching or eager != v.enforce_eager:
        log.warning("rollout.routing_replay: the vLLM engines run with enable_prefix_caching=%s and enforce_eager=%s "
                    "(rollout.vllm says %s, %s): %s", prefix_caching, eager, v.enable_prefix_caching, v.enforce_eager,
                    "vLLM's routed-experts output needs prefix caching" if routing == "official" else
                    "the CPU build's routing hook sees only computed tokens, in eager mode")
    spec = dict(model_dir=str(model_dir), dtype=cfg.model.dtype, seed=cfg.trainer.seed, max_model_len=max_len,
                tensor_parallel_size=v.tensor_parallel_size, enforce_eager=eager, routing=routing,
                enable_prefix_caching=prefix_caching, max_num_seqs=cfg.rollout.max_num_seqs,
                gpu_memory_utilization=v.gpu_memory_utilization,
                kv_cache_bytes=int(kv_gb * 2**30) if kv_gb else None,
                sleep_mode=v.sleep_during_update and on_gpu)  # vLLM's CPU build has no sleep mode
    return spec


@ROLLOUT_ENGINES.register("vllm")
def build_vllm_engine(cfg: ProRLConfig, model_dir: Path) -> RolloutEngine:
    return VLLMRolloutEngine(cfg, engine_spec(cfg, model_dir), python=engine_python(cfg),
                             log_path=Path(cfg.trainer.output_dir) / "vllm_engine.log")
