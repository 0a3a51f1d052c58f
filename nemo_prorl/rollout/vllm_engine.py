"""rollout.engine=vllm: generation in vLLM, as a Ray actor (see vllm_server.py).

The trainer side imports no vLLM: the engine actor is placed by the cluster plan (nemo_prorl/cluster) and
started with the configured interpreter (`rollout.vllm.python`: the CPU build's `.venv-vllm` here, the
container's vLLM environment on GPU), and weights pass through a transfer buffer that both processes map
(shared memory; CUDA IPC when the trainer runs on GPU). A failing or dead engine raises `VLLMEngineError`
naming the engine, its node and the command, with the traceback or Ray's reason and the tail of the
engine's log (`<output_dir>/vllm_engine.log`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from nemo_prorl.cluster.actors import ActorError
from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.rollout.base import ROLLOUT_ENGINES, Completion, RolloutEngine, SamplingParams
from nemo_prorl.torch_utils import DTYPES

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MODULE = "prorl_vllm_server"


class VLLMEngineError(ActorError):
    pass


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


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


class VLLMRolloutEngine(RolloutEngine):
    def __init__(self, cfg: ProRLConfig, spec: dict[str, Any], *, python: str, log_path: Path) -> None:
        from nemo_prorl import cluster
        from nemo_prorl.cluster.actors import start_group

        v = cfg.rollout.vllm
        self.weight_dtype = DTYPES[spec["dtype"]]
        self.request_timeout_s = v.request_timeout_s
        self.log_path = log_path
        self.python = python
        self._device = torch.device(cfg.cluster.device)
        self._buf: Optional[torch.Tensor] = None
        self._handle: Optional[tuple] = None
        self._shm_path: Optional[str] = None
        self.group = None
        self._dir = None
        check_interpreter(python)
        self._dir = Path(tempfile.mkdtemp(prefix="prorl-vllm-"))
        server = _server_module(self._dir)
        plan = cluster.plan_from_config(cfg, engine="vllm")
        self._session = cluster.session(cfg, plan)
        self._placement = self._session.place(plan, cfg.cluster.ray_timeout_s)
        e = plan.engines[0]
        if e.node != 0:
            self.close()
            raise VLLMEngineError(f"cluster.rollout_nodes={plan.layout.rollout_nodes}: an engine on node {e.node} needs "
                                  "weights sent across nodes, which this runtime does not do yet; use 0 (colocated)",
                                  role="vllm engine")
        if plan.layout.kind == "gpu" and len(e.devices) > 1:
            self.close()
            raise VLLMEngineError(f"rollout.vllm.tensor_parallel_size={len(e.devices)}: an engine actor over several "
                                  "GPUs is not started by this runtime yet; use 1", role="vllm engine")
        shared = any((r.node, r.device) == (e.node, e.devices[0]) for r in plan.ranks)
        env = {"PYTHONPATH": os.pathsep.join(p for p in (str(self._dir), os.environ.get("PYTHONPATH")) if p),
               "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.group = start_group("vllm engine", server.EngineServer, self._placement,
                                     [(e.node, e.devices[0], 0.5 if shared else 1.0)], init_args=[(str(log_path),)],
                                     env=env, runtime_env={"py_executable": python}, timeout_s=v.startup_timeout_s,
                                     error_type=VLLMEngineError)
            self.pid = self.group.call_all("node_info", timeout_s=60)[0]["pid"]
            self._call("init", spec, timeout=v.startup_timeout_s)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ transport
    def _call(self, cmd: str, *args: Any, timeout: Optional[float] = None) -> Any:
        if self.group is None:
            raise VLLMEngineError("the vLLM engine has been closed", role="vllm engine", command=cmd)
        try:
            return self.group.call_all(cmd, *args, timeout_s=timeout or self.request_timeout_s)
        except VLLMEngineError as e:
            raise VLLMEngineError(f"{e}\n(engine interpreter: {self.python}); last lines of {self.log_path}:\n"
                                  f"{_tail(self.log_path)}", role=e.role, index=e.index, node=e.node,
                                  command=e.command) from None

    def staging_buffer(self, nbytes: int) -> torch.Tensor:
        if self._buf is None or self._buf.numel() < nbytes:
            self._release_buffer()
            if self._device.type == "cuda":
                from torch.multiprocessing.reductions import reduce_tensor

                self._buf = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
                self._handle = ("cuda", reduce_tensor(self._buf))
            else:
                shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else self._dir
                self._shm_path = str(shm / f"prorl-vllm-{os.getpid()}-{secrets.token_hex(8)}-{nbytes}")
                # created here, ours alone: never a file (or a link) someone put at that name beforehand
                os.close(os.open(self._shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
                self._buf = torch.from_file(self._shm_path, shared=True, size=nbytes, dtype=torch.uint8)
                self._handle = ("shm", self._shm_path, nbytes)
        return self._buf

    def _release_buffer(self) -> None:
        self._buf = self._handle = None
        if self._shm_path is not None:
            Path(self._shm_path).unlink(missing_ok=True)  # the engine's mapping lives on until it remaps
            self._shm_path = None

    def _offset(self, t: torch.Tensor) -> Optional[int]:
        """Byte offset of `t` in the transfer buffer, or None when it lies elsewhere."""
        if self._buf is None or t.device != self._buf.device or not t.is_contiguous():
            return None
        off = t.data_ptr() - self._buf.data_ptr()
        return off if 0 <= off and off + t.numel() * t.element_size() <= self._buf.numel() else None

    # ------------------------------------------------------------------ RolloutEngine
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        out = self._call("generate", [list(p) for p in prompts], dataclasses.asdict(params))[0]
        return [Completion(prompt_index=i, token_ids=ids, logprobs=lps, finish_reason=fr) for i, ids, lps, fr in out]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        items = list(weights)
        if any(self._offset(t) is None for _, t in items):  # not built in the buffer by the weight sync
            from nemo_prorl.policy.base import LazyWeight
            from nemo_prorl.weight_sync import pack, packed_size

            lazy = [LazyWeight(n, (t.clone() if self._offset(t) is not None else t,)) for n, t in items]
            items = pack(lazy, self.staging_buffer(packed_size(lazy, self.weight_dtype)), self.weight_dtype)
        metas = [(name, self._offset(t), list(t.shape), _DTYPE_NAMES[t.dtype]) for name, t in items]
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()  # the engine reads it on its own stream
        self._call("load_bucket", self._handle, metas)[0]

    def begin_weight_update(self) -> None:
        self._call("begin_weight_update")

    def finish_weight_update(self) -> None:
        self._call("finish_weight_update")

    def sleep(self) -> None:
        self._call("sleep")

    def wake_up(self) -> None:
        self._call("wake_up")

    def close(self) -> None:
        group, self.group = getattr(self, "group", None), None
        if group is not None:
            group.kill()
        placement, self._placement = getattr(self, "_placement", None), None
        if placement is not None:
            self._session.release(placement)
        self._release_buffer()
        if getattr(self, "_dir", None) is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self) -> None:
        if getattr(self, "group", None) is not None:
            self.close()


def _model_max_len(model_dir: Path) -> Optional[int]:
    try:
        return json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None


@ROLLOUT_ENGINES.register("vllm")
def build_vllm_engine(cfg: ProRLConfig, model_dir: Path) -> RolloutEngine:
    v = cfg.rollout.vllm
    on_gpu = cfg.cluster.device.startswith("cuda")
    max_len = v.max_model_len or cfg.data.max_prompt_length + cfg.rollout.max_response_length
    model_max = _model_max_len(Path(model_dir))
    if v.max_model_len is None and model_max:
        max_len = min(max_len, model_max)  # vLLM refuses more positions than the model was built for
    kv_gb = v.kv_cache_gb if v.kv_cache_gb is not None else (None if on_gpu else 1.0)
    spec = dict(model_dir=str(model_dir), dtype=cfg.model.dtype, seed=cfg.trainer.seed, max_model_len=max_len,
                tensor_parallel_size=v.tensor_parallel_size, enforce_eager=v.enforce_eager,
                enable_prefix_caching=v.enable_prefix_caching, max_num_seqs=cfg.rollout.max_num_seqs,
                gpu_memory_utilization=v.gpu_memory_utilization,
                kv_cache_bytes=int(kv_gb * 2**30) if kv_gb else None,
                sleep_mode=v.sleep_during_update and on_gpu)  # vLLM's CPU build has no sleep mode
    python = v.python or os.environ.get("PRORL_VLLM_PYTHON") or sys.executable
    return VLLMRolloutEngine(cfg, spec, python=python, log_path=Path(cfg.trainer.output_dir) / "vllm_engine.log")
