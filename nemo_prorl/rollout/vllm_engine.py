"""rollout.engine=vllm: generation in vLLM, running in its own process (see vllm_server.py).

The trainer side imports no vLLM: it starts the engine process with the configured interpreter (the
trainer's own, or a separate virtualenv such as the CPU build's), talks to it over an authenticated
local socket, and passes weights through a transfer buffer that both processes map (shared memory; CUDA
IPC when the trainer runs on GPU). A dead or failing engine process raises `VLLMEngineError` with the
command, the exit code or traceback, and the tail of the engine's log."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.rollout.base import ROLLOUT_ENGINES, Completion, RolloutEngine, SamplingParams
from nemo_prorl.torch_utils import DTYPES

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class VLLMEngineError(RuntimeError):
    pass


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class VLLMRolloutEngine(RolloutEngine):
    def __init__(self, spec: dict[str, Any], *, python: str, log_path: Path, device: str = "cpu",
                 startup_timeout_s: float = 900.0, request_timeout_s: float = 7200.0) -> None:
        self.weight_dtype = DTYPES[spec["dtype"]]
        self.request_timeout_s = request_timeout_s
        self.log_path = log_path
        self._device = torch.device(device)
        self._buf: Optional[torch.Tensor] = None
        self._handle: Optional[tuple] = None
        self._shm_path: Optional[str] = None
        self._conn = None
        self._dir = Path(tempfile.mkdtemp(prefix="prorl-vllm-"))
        shutil.copy(Path(__file__).with_name("vllm_server.py"), self._dir / "prorl_vllm_server.py")
        authkey = os.urandom(32)
        env = dict(os.environ, PRORL_VLLM_AUTHKEY=authkey.hex(),
                   PYTHONPATH=os.pathsep.join(p for p in (str(self._dir), os.environ.get("PYTHONPATH")) if p))
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in the server process: one hop less
        log_path.parent.mkdir(parents=True, exist_ok=True)
        address = str(self._dir / "engine.sock")
        with open(log_path, "ab") as log:
            try:
                self._proc = subprocess.Popen([python, "-m", "prorl_vllm_server", address], stdout=log,
                                              stderr=subprocess.STDOUT, env=env, cwd=self._dir)
            except OSError as e:
                raise VLLMEngineError(f"rollout.vllm.python={python!r} cannot be started: {e}") from e
        deadline = time.monotonic() + startup_timeout_s
        while self._conn is None:
            self._check_alive("startup")
            try:
                self._conn = Client(address, family="AF_UNIX", authkey=authkey)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    self.close()
                    raise VLLMEngineError(f"vLLM engine did not start within {startup_timeout_s:.0f}s; "
                                          f"see {log_path}") from None
                time.sleep(0.2)
        try:
            self._call("init", spec, timeout=max(deadline - time.monotonic(), 1.0))
        except VLLMEngineError as e:
            self.close()
            raise VLLMEngineError(f"{e}\n(engine interpreter: {python}; log: {log_path})") from None

    # ------------------------------------------------------------------ transport
    def _check_alive(self, what: str) -> None:
        code = self._proc.poll()
        if code is not None:
            raise VLLMEngineError(f"vLLM engine process exited with code {code} during {what}; "
                                  f"last lines of {self.log_path}:\n{_tail(self.log_path)}")

    def _call(self, cmd: str, *args: Any, timeout: Optional[float] = None) -> Any:
        if self._conn is None:
            raise VLLMEngineError("the vLLM engine has been closed")
        deadline = time.monotonic() + (timeout or self.request_timeout_s)
        try:
            self._conn.send((cmd, args))
            while not self._conn.poll(1.0):
                self._check_alive(cmd)
                if time.monotonic() > deadline:
                    raise VLLMEngineError(f"vLLM engine: {cmd} took longer than {timeout or self.request_timeout_s:.0f}s")
            status, payload = self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError) as e:
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            self._check_alive(cmd)
            raise VLLMEngineError(f"vLLM engine: connection lost during {cmd}; see {self.log_path}") from e
        if status != "ok":
            raise VLLMEngineError(f"vLLM engine: {cmd} failed:\n{payload}")
        return payload

    def staging_buffer(self, nbytes: int) -> torch.Tensor:
        if self._buf is None or self._buf.numel() < nbytes:
            self._release_buffer()
            if self._device.type == "cuda":
                from torch.multiprocessing.reductions import reduce_tensor

                self._buf = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
                self._handle = ("cuda", reduce_tensor(self._buf))
            else:
                shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else self._dir
                self._shm_path = str(shm / f"prorl-vllm-{os.getpid()}-{id(self)}-{nbytes}")
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
        out = self._call("generate", [list(p) for p in prompts], dataclasses.asdict(params))
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
        self._call("load_bucket", self._handle, metas)

    def begin_weight_update(self) -> None:
        self._call("begin_weight_update")

    def finish_weight_update(self) -> None:
        self._call("finish_weight_update")

    def sleep(self) -> None:
        self._call("sleep")

    def wake_up(self) -> None:
        self._call("wake_up")

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.send(("stop", ()))
                conn.poll(30)
            except (OSError, EOFError):
                pass
            conn.close()
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._release_buffer()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self) -> None:
        if getattr(self, "_dir", None) is not None and getattr(self, "_conn", None) is not None:
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
    return VLLMRolloutEngine(spec, python=python, log_path=Path(cfg.trainer.output_dir) / "vllm_engine.log",
                             device=cfg.cluster.device, startup_timeout_s=v.startup_timeout_s,
                             request_timeout_s=v.request_timeout_s)
