"""The vLLM engine actor. It owns one offline `vllm.LLM` and serves the trainer's `VLLMRolloutEngine`
as a Ray actor, placed by the cluster plan and started in vLLM's own Python environment (Ray's
`py_executable`: `.venv-vllm` on CPU, the vLLM environment of the container on GPU), so vLLM's pins never
touch the trainer's.

That environment has no nemo_prorl, so this file is self-contained: it needs only torch, vllm and ray,
and the trainer ships it as the top-level module `prorl_vllm_server` (a copy in a private folder on
PYTHONPATH, which vLLM's worker processes inherit, so that they can import `ProRLWorkerExtension` too).

Weights arrive in the trainer's transfer buffer (shared memory, or CUDA IPC on GPU) as HF-named full
tensors; `ProRLWorkerExtension` hands them to the model's own `load_weights` (which applies vLLM's TP
sharding and QKV / gate-up fusion) inside vLLM's layerwise reload, so kernels that repack weights after
loading (the CPU build's oneDNN / SGL packing) are redone for the new values.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

MODULE = "prorl_vllm_server"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _open_buffer(handle: tuple) -> torch.Tensor:
    """The trainer's transfer buffer, mapped into this process: ("shm", path, nbytes) or ("cuda", ipc)."""
    if handle[0] == "shm":
        _, path, nbytes = handle
        # torch.from_file would create a missing file (and load zeros): the sender's file must be there
        import stat

        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError as e:
            raise RuntimeError(f"transfer buffer {path} is gone ({e.strerror}): a stale handle") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size < nbytes:
            raise RuntimeError(f"transfer buffer {path}: not the sender's {nbytes}-byte file")
        return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    rebuild, args = handle[1]  # torch.multiprocessing.reductions.reduce_tensor of a CUDA uint8 tensor
    return rebuild(*args)


def buffer_views(owner: Any, handle: tuple, metas: list[tuple[str, int, list[int], str]]) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs a bucket's `metas` describe, as views of the transfer buffer `handle` names
    (mapped once and kept on `owner` until another buffer comes)."""
    cache = owner.__dict__.setdefault("_prorl_buffers", {})
    if handle not in cache:
        cache.clear()  # the sender grew or replaced its buffer: the old mapping is dead
        cache[handle] = _open_buffer(handle)
    buf = cache[handle]
    weights = []
    for name, offset, shape, dtype in metas:
        dt = _DTYPES[dtype]
        n = dt.itemsize
        for d in shape:
            n *= d
        weights.append((name, buf[offset : offset + n].view(dt).view(shape)))
    return weights


def finish_reads(handle: tuple) -> None:
    """On GPU the copies out of the buffer are queued on this process's stream: they must be done before
    the sender refills the buffer with the next bucket."""
    if handle[0] == "cuda":
        torch.cuda.current_stream().synchronize()


def _detach_pending(buf: torch.Tensor) -> None:
    """Layerwise reload holds on to the tensors of a layer until all of its weights have arrived; those
    that still point into the transfer buffer are copied out before the trainer refills it. The trainer
    keeps each attention and MLP block in one bucket, so this is rare (a safety net)."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    ptr = buf.untyped_storage().data_ptr()
    for info in list(LAYERWISE_INFO.values()):
        for _, bound in info.loaded_weights:
            for key, value in bound.arguments.items():
                if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == ptr:
                    bound.arguments[key] = value.clone()


class ProRLWorkerExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`); called through `LLM.collective_rpc`."""

    def prorl_begin_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())

    def prorl_load_bucket(self, handle: tuple, metas: list[tuple[str, int, list[int], str]]) -> int:
        weights = buffer_views(self, handle, metas)
        self.model_runner.get_model().load_weights(weights=weights)
        _detach_pending(self._prorl_buffers[handle])
        finish_reads(handle)
        return len(weights)

    def prorl_finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        finalize_layerwise_reload(self.model_runner.get_model(), self.model_runner.model_config)


class EngineServer:
    """The actor: `init` builds the engine (so that a failure comes back as that command's traceback),
    then generate / weight updates / sleep. Its output goes to the run's engine log. Its commands run one
    at a time: a weight update never lands during a generate call (the pool keeps them apart too)."""

    def __init__(self, log_path: str) -> None:
        import signal

        self.version = 0  # the policy version of the weights it holds (finish_weight_update)
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # Slurm signals every process; the trainer checkpoints
            signal.signal(sig, signal.SIG_IGN)      # first and then stops this engine itself
        if log_path:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)

    def node_info(self) -> dict[str, Any]:
        import socket

        import ray

        return {"ip": ray.util.get_node_ip_address(), "host": socket.gethostname(), "pid": os.getpid(),
                "gpus": [str(g) for g in ray.get_gpu_ids()], "node_id": ray.get_runtime_context().get_node_id()}

    def init(self, spec: dict[str, Any]) -> None:
        from vllm import LLM

        self.sleep_mode = bool(spec["sleep_mode"])
        kwargs = dict(
            model=spec["model_dir"], dtype=spec["dtype"], seed=spec["seed"], max_model_len=spec["max_model_len"],
            tensor_parallel_size=spec["tensor_parallel_size"], enforce_eager=spec["enforce_eager"],
            enable_prefix_caching=spec["enable_prefix_caching"], max_num_seqs=spec["max_num_seqs"],
            gpu_memory_utilization=spec["gpu_memory_utilization"], enable_sleep_mode=self.sleep_mode,
            # sampling logprobs after temperature and top-p: the distribution each token was drawn from
            logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{MODULE}.ProRLWorkerExtension",
        )
        if spec.get("kv_cache_bytes"):
            kwargs["kv_cache_memory_bytes"] = spec["kv_cache_bytes"]
        self.llm = LLM(**kwargs)
        self.asleep = False

    def generate(self, prompts: list[list[int]], p: dict[str, Any],
                 seeds: list[int]) -> list[tuple[int, list[int], list[float], str, list[int]]]:
        """n samples of each prompt, prompt i drawn with seeds[i] (the trainer derives it from the step
        and the prompt's index in the step, so it does not depend on the engine the prompt lands on); each
        token's policy version is the engine's at the call's start (no update lands during a call)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake_up()
        if not prompts:
            return []
        version = self.version
        params = [SamplingParams(n=p["n"], temperature=p["temperature"], top_p=p["top_p"], max_tokens=p["max_tokens"],
                                 stop_token_ids=list(p["stop_token_ids"]), stop=list(p["stop"]) or None,
                                 include_stop_str_in_output=True, seed=seeds[i], logprobs=0,
                                 skip_special_tokens=False, detokenize=bool(p["stop"]))
                  for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(x)) for x in prompts], params, use_tqdm=False)
        result = []
        for i, out in enumerate(outs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [c.logprobs[t][tok].logprob for t, tok in enumerate(ids)]
                reason = "length" if c.finish_reason == "length" else "stop"
                result.append((i, ids, lps, reason, [version] * len(ids)))
        return result

    def begin_weight_update(self) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays released until the weights are in
        self.llm.collective_rpc("prorl_begin_weight_update")

    def load_bucket(self, handle: tuple, metas: list) -> int:
        return sum(self.llm.collective_rpc("prorl_load_bucket", args=(handle, metas)))

    def finish_weight_update(self, version: Optional[int] = None) -> None:
        self.llm.collective_rpc("prorl_finish_weight_update")
        self.llm.reset_prefix_cache()  # cached prefixes hold keys and values of the old weights
        self.version = self.version + 1 if version is None else version
        self.wake_up()

    def sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            # Level 1 keeps a host copy of the weights: a step that skips its update (every group uniform)
            # wakes the engine without a sync, and level 2 would leave it with no weights at all.
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


SMOKE_MARK = "prorl-engine-smoke "


def smoke(spec: dict[str, Any]) -> dict[str, Any]:
    """`prorl doctor`: build the engine from the trainer's spec, as an engine actor does (worker extension
    included), go through sleep and wake-up where the spec asks for sleep mode, and sample a few tokens.
    Progress and figures come back on marked lines of stdout."""
    import json
    import math
    import signal
    import time

    t0 = time.perf_counter()
    server = EngineServer("")
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # no trainer here to stop this process: the defaults
        signal.signal(sig, signal.SIG_DFL)
    server.init(spec)
    result: dict[str, Any] = {"start_s": round(time.perf_counter() - t0, 1)}
    print(SMOKE_MARK + json.dumps(result), flush=True)
    t1 = time.perf_counter()
    server.sleep()  # a no-op without sleep mode
    server.wake_up()
    params = dict(n=2, temperature=1.0, top_p=1.0, max_tokens=8, stop_token_ids=[], stop=[])
    out = server.generate([[1, 2, 3, 4]], params, seeds=[0])
    result.update(generate_s=round(time.perf_counter() - t1, 2), samples=len(out),
                  tokens=sum(len(o[1]) for o in out), slept=server.sleep_mode,
                  finite_logprobs=all(math.isfinite(lp) and lp <= 0.0 for o in out for lp in o[2]))
    print(SMOKE_MARK + json.dumps(result), flush=True)
    return result
