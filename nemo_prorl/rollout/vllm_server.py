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

An engine over several devices (`rollout.vllm.tensor_parallel_size`) is still one actor: vLLM starts its
TP worker processes itself (multiprocessing executor) on this actor's node, each of which maps the buffer
and loads the full tensors (vLLM's loader keeps its own shard).

Routing replay (mixture-of-experts models): `generate` also returns the experts every MoE layer chose
for each token it fed, from vLLM's own routed-experts output where it has one (its V2 model runner, GPU)
or, in the CPU build, from a capture callback on its routers (`RoutingRecorder`).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

MODULE = "prorl_vllm_server"
# The engine pool's private folder (vllm_engine.py makes it, and removes it when the pool closes): vLLM's
# rendezvous file (vllm_dist_*) and its IPC sockets go there instead of /tmp, where every engine that was
# killed rather than shut down would leave them behind.
TMP_ENV = "PRORL_VLLM_TMP"
# A unix socket's path has at most 107 bytes; vLLM's are "<folder>/<uuid4>" (37 more). A longer folder (a
# long TMPDIR) keeps vLLM's default for the sockets.
MAX_SOCKET_DIR = 64
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


def _use_private_tmp() -> None:
    """Point vLLM's temporary files at the pool's folder when it is on this node (TMP_ENV)."""
    import tempfile

    private = os.environ.get(TMP_ENV)
    if private and os.path.isdir(private):
        if len(private) <= MAX_SOCKET_DIR:
            os.environ["VLLM_RPC_BASE_PATH"] = private  # its zmq IPC sockets
        os.environ["TMPDIR"] = private  # the processes it starts (tensor-parallel workers)
        tempfile.tempdir = private  # this process: the file:// rendezvous of torch.distributed


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


def _moe_runners(model: torch.nn.Module) -> list[Any]:
    """The model's MoE layers (vLLM's `MoERunner`s, which own the routers), in model order."""
    from vllm.model_executor.layers.fused_moe.layer import MoERunner

    return sorted((m for m in model.modules() if isinstance(m, MoERunner)), key=lambda m: m.layer_id)


def _cpu_moe_layers(model: torch.nn.Module, unbuilt: bool = False) -> list[Any]:
    """The CPU build's unquantized MoE expert layers (with a built kernel; `unbuilt`: without one)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    out = []
    for m in model.modules():
        method = getattr(m, "quant_method", None)
        if hasattr(m, "w13_weight") and hasattr(method, "moe_kernel") and hasattr(method, "_init_moe_kernel"):
            if (method.moe_kernel is None) == unbuilt:
                out.append(m)
    return out


class RoutingRecorder:
    """Routing capture for the CPU build (vLLM's own routed-experts output needs its V2 model runner,
    which runs on Triton GPUs only): each MoE router's capture callback (`BaseRouter.capture_fn`, called
    with the logical top-k expert ids of every token of a forward) lands here; at the step's first MoE
    layer the model runner's current batch says which request and position each token row is. Rows are
    kept per vLLM request until `take`; a position computed twice (KV rebuilt after preemption) keeps the
    later forward's routing. Tokens served from the prefix cache are never computed, so the engine turns
    prefix caching off when it records this way (EngineServer.init)."""

    def __init__(self, runner: Any, layer_ids: list[int]) -> None:
        self.runner = runner
        self.column = {lid: i for i, lid in enumerate(layer_ids)}
        self.first = layer_ids[0]
        self.step: Optional[tuple[list[str], Any, torch.Tensor, torch.Tensor, list]] = None
        self.chunks: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def capture(self, layer_id: int, topk_ids: torch.Tensor) -> None:
        if layer_id == self.first:
            self._flush()
            r = self.runner
            num = r.input_batch.num_reqs
            if num == 0:  # a dummy forward (warm-up, profiling): no request's tokens
                return
            n = int(r.num_scheduled_tokens.np[:num].sum())
            # tokens are laid out request by request (input_batch order), rows beyond n are padding
            self.step = (list(r.input_batch.req_ids[:num]), r.req_indices.np[:n].copy(),
                         r.positions[:n].to("cpu", torch.int64).clone(), r.input_ids.cpu[:n].to(torch.int64).clone(),
                         [None] * len(self.column))
        if self.step is not None:
            n = len(self.step[1])
            self.step[4][self.column[layer_id]] = topk_ids[:n].to("cpu", torch.int16)

    def _flush(self) -> None:
        step, self.step = self.step, None
        if step is None or any(t is None for t in step[4]):
            return
        req_ids, req_index, positions, tokens, layers = step
        experts = torch.stack(layers, dim=1)  # [n, layers, k]
        index = torch.from_numpy(req_index)
        for j, rid in enumerate(req_ids):
            rows = index == j
            if bool(rows.any()):
                self.chunks.setdefault(rid, []).append((positions[rows], tokens[rows], experts[rows]))

    def take(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{vLLM request id: (token id fed at each position (-1: none), experts [positions, layers, k])},
        and forget them."""
        self._flush()
        chunks, self.chunks = self.chunks, {}
        out = {}
        for rid, parts in chunks.items():
            total = max(int(p.max()) for p, _, _ in parts) + 1
            tokens = torch.full((total,), -1, dtype=torch.int64)
            experts = torch.zeros((total, *parts[0][2].shape[1:]), dtype=torch.int16)
            for pos, tok, exp in parts:  # in step order: a recomputed position keeps its latest routing
                tokens[pos] = tok
                experts[pos] = exp
            out[rid] = (tokens, experts)
        return out


class ProRLWorkerExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`); called through `LLM.collective_rpc`."""

    def prorl_routing_init(self, mode: str) -> list[int]:
        """The MoE layers' ids in model order; with mode "hook", the first TP rank records routing (the
        routers are replicated over TP, so every rank picks the same experts)."""
        runners = _moe_runners(self.model_runner.get_model())
        layer_ids = [m.layer_id for m in runners]
        if mode == "hook" and layer_ids and self.rank == 0:
            from functools import partial

            self._prorl_routing = RoutingRecorder(self.model_runner, layer_ids)
            for m in runners:
                m.router.set_capture_fn(partial(self._prorl_routing.capture, m.layer_id))
        return layer_ids

    def prorl_take_routing(self) -> Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        recorder = getattr(self, "_prorl_routing", None)
        return recorder.take() if recorder is not None else None

    def prorl_begin_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        model = self.model_runner.get_model()
        initialize_layerwise_reload(model)
        # vLLM's unquantized MoE method repacks its experts for the CPU kernel only when it has no kernel
        # yet (`moe_kernel is None`: the first load); on a reload it would hand the kernel the new weights
        # unpacked (wrong experts' outputs; with a padded expert FFN, a shape error). Dropping the kernel
        # makes the reload process the layer as a first load, into the same packed tensors.
        for layer in _cpu_moe_layers(model):
            layer.quant_method.moe_kernel = None

    def prorl_load_bucket(self, handle: tuple, metas: list[tuple[str, int, list[int], str]]) -> int:
        weights = buffer_views(self, handle, metas)
        self.model_runner.get_model().load_weights(weights=weights)
        _detach_pending(self._prorl_buffers[handle])
        finish_reads(handle)
        return len(weights)

    def prorl_finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        model = self.model_runner.get_model()
        finalize_layerwise_reload(model, self.model_runner.model_config)
        for layer in _cpu_moe_layers(model, unbuilt=True):  # no weights came for it: its packed ones stay
            layer.quant_method._init_moe_kernel(layer)


def _parse_request_id(internal: str) -> Optional[tuple[str, int]]:
    """(LLM's request id, sample index) of a vLLM engine request id: vLLM appends "-<8 random>" to the id
    LLM.generate gives (a counter), and names sample i of an n > 1 request "<i>_<id>-<random>"."""
    import re

    m = re.fullmatch(r"(?:(\d+)_)?(\d+)(?:-[0-9A-Za-z]+)?", internal)
    return (m.group(2), int(m.group(1) or 0)) if m else None


def cpu_threads_bind(tp: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for the CPU build's `tp` worker processes. vLLM's "auto" gives each
    worker a NUMA node of its own and refuses more workers than nodes (TP=2 on a one-node machine): here
    the cores this process may use are split into `tp` consecutive groups ("0|1" on two cores); with
    fewer cores than workers, no binding ("nobind")."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cores) < tp:
        return "nobind"
    per = len(cores) // tp
    return "|".join(",".join(str(c) for c in cores[i * per : (i + 1) * per]) for i in range(tp))


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
        tp = spec.get("tensor_parallel_size", 1)  # (read before vLLM's import, whose failure is reported first)
        if tp > 1 and spec.get("visible_devices"):
            # GPU: Ray showed this actor only its own device; its vLLM workers need all of the engine's
            # (cluster.actors.engine_gpus, its own first). Before vLLM (and torch.cuda) count the devices.
            os.environ["CUDA_VISIBLE_DEVICES"] = spec["visible_devices"]
        _use_private_tmp()
        from vllm import LLM
        from vllm.platforms import current_platform

        if tp > 1 and current_platform.is_cpu() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind(tp)

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
        if spec["tensor_parallel_size"] > 1:
            # vLLM would pick its Ray executor inside our placement group and ask Ray for devices the
            # plan already gave this actor: its own worker processes instead, on this actor's node
            kwargs["distributed_executor_backend"] = "mp"
        self.routing = spec.get("routing")  # None | "hook" (CPU build) | "official" (vLLM's, V2 runner)
        if self.routing == "official":
            kwargs["enable_return_routed_experts"] = True  # needs prefix caching on (engine_spec)
        elif self.routing == "hook":
            kwargs["enable_prefix_caching"] = False  # cached prefixes are not computed: their routing unseen
        self.llm = LLM(**kwargs)
        self.asleep = False
        self.moe_layers: list[int] = []
        if self.routing:
            self.moe_layers = self.llm.collective_rpc("prorl_routing_init", args=(self.routing,))[0]
            if not self.moe_layers:
                raise RuntimeError(f"rollout.routing_replay=true, but {spec['model_dir']} has no mixture-of-experts "
                                   "layers (no routing to record): turn it off for dense models")

    def generate(self, prompts: list[list[int]], p: dict[str, Any],
                 seeds: list[int]) -> list[tuple]:
        """n samples of each prompt, prompt i drawn with seeds[i] (the trainer derives it from the step
        and the prompt's index in the step, so it does not depend on the engine the prompt lands on); each
        token's policy version is the engine's at the call's start (no update lands during a call). Rows:
        (prompt index, token ids, logprobs, finish reason, versions[, routed experts (routing replay)])."""
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
        recorded = {}
        if self.routing == "hook":  # the first TP rank's recordings, by (request id, sample index)
            taken = self.llm.collective_rpc("prorl_take_routing")[0]
            recorded = {_parse_request_id(rid): v for rid, v in taken.items()}
        result = []
        for i, out in enumerate(outs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [c.logprobs[t][tok].logprob for t, tok in enumerate(ids)]
                reason = "length" if c.finish_reason == "length" else "stop"
                row: tuple = (i, ids, lps, reason, [version] * len(ids))
                if self.routing:
                    row += (self._routing(list(prompts[i]) + ids[:-1], out.request_id, c, recorded),)
                result.append(row)
        return result

    def _routing(self, fed: list[int], request_id: str, c: Any, recorded: dict) -> tuple:
        """The experts of the tokens the engine fed for completion `c` (prompt + response minus its last
        token), as (shape, int16 bytes): plain bytes cross from this environment's torch and numpy to the
        trainer's whatever their versions."""
        if self.routing == "official":
            if c.routed_experts is None or len(c.routed_experts) < len(fed):
                raise RuntimeError(f"vLLM returned no routed experts for all {len(fed)} tokens of request {request_id}")
            experts = torch.from_numpy(c.routed_experts[: len(fed)].astype("int16"))
            if experts.shape[1] != len(self.moe_layers):  # vLLM's rows cover every decoder layer
                experts = experts[:, self.moe_layers]
        else:
            if (request_id, c.index) not in recorded:
                raise RuntimeError(f"no routing was recorded for request {request_id} sample {c.index}")
            tokens, experts = recorded[(request_id, c.index)]
            if len(tokens) < len(fed) or tokens[: len(fed)].tolist() != fed:  # the mapping's own check
                raise RuntimeError(f"routing of request {request_id} sample {c.index} was recorded for other tokens")
            experts = experts[: len(fed)]
        experts = experts.contiguous()
        return tuple(experts.shape), experts.numpy().tobytes()

    def begin_weight_update(self) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays released until the weights are in
        self.llm.collective_rpc("prorl_begin_weight_update")

    def load_bucket(self, handle: tuple, metas: list) -> int:
        return max(self.llm.collective_rpc("prorl_load_bucket", args=(handle, metas)))  # each TP worker loads all

    def finish_weight_update(self, version: Optional[int] = None) -> None:
        self.llm.collective_rpc("prorl_finish_weight_update")
        # Cached prefixes hold keys and values (and, on the routed-experts path, the routing) of the old
        # weights: a reset that did not happen would replay them silently
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM did not reset its prefix cache after a weight update (requests still running?)")
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
