"""`policy.backend=megatron`: the policy update on megatron-core, behind the same interface as the
transformers backend.

The trainer stays one process (a single controller, as in verl): this class starts one worker process
per rank (tensor x pipeline x data parallel, see policy/megatron_worker.py), sends every command to all
of them and gathers the answers. Data parallelism splits a mini-batch's rows; the loss normalisers are
the mini-batch totals and gradients are summed over ranks, so the update does not depend on the layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import queue
import socket
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.policy.base import POLICY_BACKENDS, STATE_FILE, Batch, LazyWeight, LossFn, PolicyBackend
from nemo_prorl.policy.megatron_convert import ModelShape, megatron_to_hf_lazy
from nemo_prorl.policy.megatron_worker import WorkerSpec, worker_main
from nemo_prorl.policy.parallel import Launch, launch_from_env
from nemo_prorl.procs import track


log = logging.getLogger("nemo_prorl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))  # free on every interface: ranks on other nodes connect to it
        return sock.getsockname()[1]


class MegatronWorkerError(RuntimeError):
    pass


# Remote ranks talk plain pickle over TCP: torch's multiprocessing pickler would send tensors as
# shared-memory handles, which mean nothing on another node.
def _send(conn: Any, obj: Any) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Any) -> Any:
    return pickle.loads(conn.recv_bytes())


class _Sender:
    """A connection with a queue's put(), so that remote and local workers look the same."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def put(self, item: Any) -> None:
        _send(self.conn, item)


class _Receiver:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def get(self) -> Any:
        return _recv(self.conn)


def _authkey(launch: Launch) -> bytes:
    # Shared by all processes of one job without any exchange; PRORL_AUTHKEY adds a secret of the user's.
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")
    return hashlib.sha256(f"{launch.master_addr}:{launch.master_port}:{job}:{os.environ.get('PRORL_AUTHKEY', '')}"
                          .encode()).digest()


def serve_remote_worker(launch: Launch, connect_timeout_s: float = 1800.0) -> None:
    """Ranks 1.. of a launched job: connect to the trainer on rank 0, take a worker spec, serve commands."""
    from multiprocessing.connection import Client

    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            conn = Client((launch.master_addr, launch.master_port + 1), authkey=_authkey(launch))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise MegatronWorkerError(f"rank {launch.rank}: no trainer at {launch.master_addr}:"
                                          f"{launch.master_port + 1} after {connect_timeout_s:.0f}s") from None
            time.sleep(1.0)
    _send(conn, ("hello", launch.rank))
    spec = dataclasses.replace(_recv(conn), local_rank=launch.local_rank)
    log.info("rank %d: serving as megatron worker for the trainer at %s", launch.rank, launch.master_addr)
    worker_main(spec, _Receiver(conn), _Sender(conn))
    conn.close()


class MegatronPolicy(PolicyBackend):
    def __init__(self, cfg: ProRLConfig, model_dir: Path, *, use_reference: bool) -> None:
        from transformers import AutoConfig

        self.cfg = cfg
        self.model_dir = Path(model_dir)
        m = self.m = cfg.policy.megatron
        self.hf_config = AutoConfig.from_pretrained(model_dir)
        self.shape = ModelShape.from_hf_config(self.hf_config)
        self.world = m.tensor_parallel_size * m.pipeline_parallel_size * m.data_parallel_size
        self.step = 0  # optimizer steps taken, for the warmup
        launch = launch_from_env()
        if launch is not None and launch.world_size != self.world:
            raise MegatronWorkerError(f"launched with {launch.world_size} processes, but policy.megatron asks for "
                                      f"TP x PP x DP = {self.world}: start one process per rank")
        # Launched (torchrun / srun, one process per GPU): this process is rank 0, the controller; it starts
        # rank 0's worker itself and the other ranks' processes connect to it (serve_remote_worker).
        local_ranks = range(1 if launch else self.world)
        threads = cfg.cluster.num_threads or max(1, (torch.get_num_threads()) // len(local_ranks))
        ctx = torch.multiprocessing.get_context("spawn")
        self._results = ctx.Queue()
        self._commands: list[Any] = [ctx.Queue() for _ in range(self.world)]
        port = _free_port()
        addr = launch.master_addr if launch else "127.0.0.1"
        specs = [WorkerSpec(rank=rank, world_size=self.world, master_port=port, model_dir=str(model_dir), megatron=m,
                            optim=cfg.policy.optim, dtype=cfg.model.dtype, seed=cfg.trainer.seed,
                            use_reference=use_reference, num_threads=threads, master_addr=addr,
                            entropy_grad=cfg.algo.entropy_coef > 0)
                 for rank in range(self.world)]
        self._procs = []
        self._remote: list[Any] = []
        for rank in local_ranks:
            # not daemonic: megatron's checkpoint writer starts processes of its own; `track` still kills a
            # worker left alive at exit, and a worker whose trainer died stops by itself
            proc = track(ctx.Process(target=worker_main, args=(specs[rank], self._commands[rank], self._results),
                                     daemon=False, name=f"megatron-rank{rank}"))
            proc.start()
            self._procs.append(proc)
        if launch is not None:
            self._accept_remote(launch, specs)
        # (tp, pp, dp) of each rank, as megatron laid out the process groups
        self.layout: list[tuple[int, int, int]] = self._gather("startup")

    def _accept_remote(self, launch: Launch, specs: list[WorkerSpec]) -> None:
        """Wait for ranks 1.. to connect, send each its spec, and route its answers into the results queue."""
        listener = Listener(("0.0.0.0", launch.master_port + 1), authkey=_authkey(launch))
        conns: dict[int, Any] = {}

        def accept() -> None:
            while len(conns) < self.world - 1:
                try:
                    conn = listener.accept()
                except OSError:
                    return  # closed by a timeout below
                _, rank = _recv(conn)
                conns[rank] = conn

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        t.join(self.m.worker_timeout_s)
        listener.close()
        if len(conns) < self.world - 1:
            self.close()
            missing = sorted(set(range(1, self.world)) - set(conns))
            raise MegatronWorkerError(f"ranks {missing} did not connect to the trainer at {launch.master_addr}:"
                                      f"{launch.master_port + 1} within {self.m.worker_timeout_s}s")
        for rank, conn in sorted(conns.items()):
            _send(conn, specs[rank])
            self._commands[rank] = _Sender(conn)
            threading.Thread(target=self._forward, args=(rank, conn), daemon=True).start()
            self._remote.append(conn)

    def _forward(self, rank: int, conn: Any) -> None:
        while True:
            try:
                item = _recv(conn)
            except (EOFError, OSError):
                if self._remote:  # not a shutdown of ours
                    self._results.put((rank, "error", f"lost the connection to megatron worker rank {rank}"))
                return
            self._results.put(item)

    # ------------------------------------------------------------------ talking to the workers
    def _gather(self, what: str) -> list[Any]:
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + self.m.worker_timeout_s
        while len(answers) < self.world:
            try:
                rank, status, value = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self._procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    why = f"{', '.join(dead)} exited (exit codes {[p.exitcode for p in self._procs]})" if dead \
                        else f"no answer within policy.megatron.worker_timeout_s={self.m.worker_timeout_s}"
                    raise MegatronWorkerError(f"megatron workers failed during {what}: {why}") from None
                continue
            if status == "error":
                self.close()
                raise MegatronWorkerError(f"megatron worker rank {rank} failed during {what}:\n{value}")
            answers[rank] = value
        return [answers[r] for r in range(self.world)]

    def _call(self, name: str, per_rank_args: list[tuple]) -> list[Any]:
        if not self._procs and not self._remote:
            raise MegatronWorkerError("the megatron workers have been shut down")
        for rank, args in enumerate(per_rank_args):
            self._commands[rank].put((name, args))
        return self._gather(name)

    def _call_all(self, name: str, *args: Any) -> list[Any]:
        return self._call(name, [args] * self.world)

    def _dp_rows(self, n: int) -> list[torch.Tensor]:
        return list(torch.arange(n).tensor_split(self.m.data_parallel_size))

    def _per_rank_batches(self, batch: Batch) -> list[dict[str, torch.Tensor]]:
        """Each rank gets the rows of its data-parallel replica (all of its TP/PP peers the same rows)."""
        n = batch["input_ids"].shape[0]
        parts = [{k: v[rows] for k, v in batch.items()} for rows in self._dp_rows(n)]
        return [parts[dp] for _, _, dp in self.layout]

    def _output_ranks(self) -> list[int]:
        """Per DP replica, in DP order, the rank that holds the loss: last pipeline stage, TP rank 0."""
        last = self.m.pipeline_parallel_size - 1
        by_dp = {dp: r for r, (tp, pp, dp) in enumerate(self.layout) if tp == 0 and pp == last}
        return [by_dp[d] for d in range(self.m.data_parallel_size)]

    # ------------------------------------------------------------------ PolicyBackend
    def logprobs(self, batch: Batch, *, temperature: float, reference: bool = False) -> torch.Tensor:
        out = self._call("logprobs", [(b, temperature, reference) for b in self._per_rank_batches(batch)])
        return torch.cat([out[r] for r in self._output_ranks()])

    def _lr(self) -> float:
        o = self.cfg.policy.optim
        # ProRL §3.2: constant learning rate, after an optional linear warmup (as the hf backend)
        return o.lr * (min(1.0, (self.step + 1) / o.warmup_steps) if o.warmup_steps else 1.0)

    def train_minibatch(self, batch: Batch, loss_fn: LossFn, *, temperature: float) -> dict[str, float]:
        lr = self._lr()
        out = self._call("train_minibatch", [(b, loss_fn, temperature, lr) for b in self._per_rank_batches(batch)])
        metrics: dict[str, float] = {}
        for r in self._output_ranks():  # loss metrics are already normalised by mini-batch totals: sum them
            for k, v in out[r].items():
                if k not in ("grad_norm", "update_skipped"):
                    metrics[k] = metrics.get(k, 0.0) + v
        grad_norm = out[0]["grad_norm"]
        skipped = out[0]["update_skipped"]
        if not skipped:
            self.step += 1
        return dict(metrics, grad_norm=grad_norm, lr=lr, update_skipped=skipped)

    def reset_reference(self) -> None:
        self._call_all("reset_reference")

    def reset_optimizer(self) -> None:
        self._call_all("reset_optimizer")
        self.step = 0

    def _shards(self) -> list[list[dict[str, torch.Tensor]]]:
        """shards[stage][tp rank]; with an interleaved pipeline, stage = chunk * PP + pipeline rank."""
        tp, pp = self.m.tensor_parallel_size, self.m.pipeline_parallel_size
        vp = self.m.virtual_pipeline_parallel_size or 1
        stages: list[list[Optional[dict]]] = [[None] * tp for _ in range(pp * vp)]
        for (t, p, d), chunks in zip(self.layout, self._call_all("export_shards")):
            if d == 0:
                for i, sd in enumerate(chunks):
                    stages[i * pp + p][t] = sd
        return stages  # type: ignore[return-value]

    def lazy_weights(self) -> Iterator[LazyWeight]:
        # The shards are the workers' live parameters, mapped through shared memory (no copy after the
        # first sync), so each full tensor is built exactly once, in the rollout engine's buffer.
        yield from megatron_to_hf_lazy(self._shards(), self.shape)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for w in self.lazy_weights():
            yield w.name, w.materialize(torch.empty(w.shape, dtype=w.dtype))

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        self.hf_config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in self.named_weights()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "layout": self.layout, "ranks": self._call_all("state_dict")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if [tuple(x) for x in state["layout"]] != self.layout:
            raise ValueError(f"policy state was saved with rank layout {state['layout']}, this run has {self.layout}: "
                             "resume with the same policy.megatron parallel sizes")
        self._call("load_state_dict", [(s,) for s in state["ranks"]])
        self.step = state["step"]

    def save_state(self, path: Path) -> None:
        """A Megatron distributed checkpoint under `path/megatron/`, written by all ranks together; on
        several nodes `path` must be on a shared file system."""
        (path / "megatron").mkdir()
        self._call_all("save_state", str(path / "megatron"))
        torch.save({"step": self.step, "layout": self.layout, "format": "megatron_dist"}, path / STATE_FILE)

    def load_state(self, path: Path) -> None:
        state = torch.load(path / STATE_FILE, weights_only=False)
        if [tuple(x) for x in state["layout"]] != self.layout:
            raise ValueError(f"policy state was saved with rank layout {state['layout']}, this run has {self.layout}: "
                             "resume with the same policy.megatron parallel sizes")
        self._call_all("load_state", str(path / "megatron"))
        self.step = state["step"]

    def close(self) -> None:
        procs, self._procs = self._procs, []
        remote, self._remote = getattr(self, "_remote", []), []
        for conn in remote:
            try:
                _send(conn, ("stop", ()))
                conn.close()
            except OSError:
                pass
        for proc, commands in zip(procs, self._commands):
            if proc.is_alive():
                commands.put(("stop", ()))
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def __del__(self) -> None:
        if getattr(self, "_procs", None):
            self.close()


@POLICY_BACKENDS.register("megatron")
def build_megatron_policy(cfg: ProRLConfig, model_dir: Path) -> PolicyBackend:
    return MegatronPolicy(cfg, model_dir, use_reference=cfg.algo.kl_coef > 0)
