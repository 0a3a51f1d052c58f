"""The Ray runtime against a plain multiprocessing peer, on this CPU, in one run.

  1. Step time of the Megatron backend at TP=2 (logprobs + a training step on the same batch): its ranks
     as Ray actors (nemo_prorl.cluster, what `policy=megatron` runs), against the same MegatronWorker code
     in two processes spawned and driven over multiprocessing queues (the pre-Ray design). Target: Ray at
     most 1.1x the peer's time.
  2. Ray's own cost: the start of a private cluster (token, loopback) and its daemons' memory (RSS of the
     GCS, raylet and helper processes), and the start of the two rank actors.

    python benchmarks/ray_runtime.py [--rows 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.megatron_policy import make_batch, make_model_dir  # noqa: E402


def _rank_loop(spec: Any, store_path: str, commands: Any, results: Any) -> None:  # a spawned rank of the peer
    from nemo_prorl.policy.megatron_worker import MegatronWorker

    # the peer's ranks meet in a FileStore in a private folder of this machine (no Ray, no port)
    worker = MegatronWorker(spec, torch.distributed.FileStore(store_path, spec.world_size))
    results.put((spec.rank, worker.layout()))
    while True:
        name, args = commands.get()
        if name == "stop":
            return
        results.put((spec.rank, getattr(worker, name)(*args)))


class SpawnPeer:
    """The Megatron ranks as spawned processes with command queues: no Ray."""

    def __init__(self, cfg: Any, model_dir: Path) -> None:
        import dataclasses

        from nemo_prorl.policy.megatron_worker import WorkerSpec

        ctx = torch.multiprocessing.get_context("spawn")
        self.store_dir = tempfile.mkdtemp(prefix="prorl-peer-")  # mode 0700: the rendezvous is ours alone
        m = cfg.policy.megatron
        self.world = m.tensor_parallel_size
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(self.world)]
        base = WorkerSpec(rank=0, world_size=self.world, model_dir=str(model_dir), megatron=m, optim=cfg.policy.optim,
                          dtype=cfg.model.dtype, seed=0, use_reference=False, num_threads=1)
        store = os.path.join(self.store_dir, "store")
        self.procs = [ctx.Process(target=_rank_loop, args=(dataclasses.replace(base, rank=r), store,
                                                           self.commands[r], self.results)) for r in range(self.world)]
        for p in self.procs:
            p.start()
        self._gather()

    def _gather(self) -> list[Any]:
        out = dict(self.results.get(timeout=600) for _ in range(self.world))
        return [out[r] for r in range(self.world)]

    def call(self, name: str, *args: Any) -> list[Any]:
        for q in self.commands:
            q.put((name, args))
        return self._gather()

    def close(self) -> None:
        for q in self.commands:
            q.put(("stop", ()))
        for p in self.procs:
            p.join(30)
        shutil.rmtree(self.store_dir, ignore_errors=True)


def _ray_daemons_mb() -> float:
    names = ("gcs_server", "raylet", "ray::", "dashboard", "log_monitor", "runtime_env", "monitor", "agent")
    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if any(n in cmd for n in names) and "MegatronRank" not in cmd:
                total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def main(rows: int, repeats: int) -> None:
    from nemo_prorl import cluster
    from nemo_prorl.config import load_config
    from nemo_prorl.policy import POLICY_BACKENDS
    from nemo_prorl.trainer.grpo import microbatch_loss

    batch = make_batch(rows)
    loss = functools.partial(microbatch_loss, clip_eps_low=0.2, clip_eps_high=0.4, clip_ratio_c=None,
                             global_num_tokens=batch["response_mask"].sum(), global_num_seqs=float(rows), horizon=384,
                             loss_agg_mode="token-mean", kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0)
    tokens = int(batch["attention_mask"].sum())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp))
        cfg, _ = load_config(["policy=megatron", f"model.path={model_dir}", "policy.megatron.tensor_parallel_size=2",
                              "policy.megatron.micro_batch_tokens=4096", "algo.kl_coef=0", "cluster.num_threads=1",
                              "policy.megatron.logprob_micro_batch_tokens=8192"])
        timings: dict[str, float] = {}

        def measure(name: str, logprobs: Any, train: Any) -> None:
            logprobs()  # warm up
            train()
            t = time.perf_counter()
            for _ in range(repeats):
                logprobs()
                train()
            timings[name] = (time.perf_counter() - t) / repeats

        t0 = time.perf_counter()
        peer = SpawnPeer(cfg, model_dir)
        peer_start = time.perf_counter() - t0
        try:
            part = {k: v for k, v in batch.items()}
            measure("spawn", lambda: peer.call("logprobs", part, 1.0, False),
                    lambda: peer.call("train_minibatch", part, loss, 1.0, cfg.policy.optim.lr))
        finally:
            peer.close()
        t0 = time.perf_counter()
        plan = cluster.plan_from_config(cfg)
        session = cluster.session(cfg, plan)
        ray_start = time.perf_counter() - t0
        daemons = _ray_daemons_mb()
        t0 = time.perf_counter()
        policy = POLICY_BACKENDS.get("megatron")(cfg, model_dir)
        actors_start = time.perf_counter() - t0
        try:
            measure("ray", lambda: policy.logprobs(batch, temperature=1.0),
                    lambda: policy.train_minibatch(batch, loss, temperature=1.0))
        finally:
            policy.close()
            cluster.close_session()
    print(f"batch: {rows} rows, {tokens} tokens; Megatron TP=2 on 2 CPU ranks (1 thread each)")
    print(f"  step (logprobs + train)   spawn peer {timings['spawn']:.3f} s   Ray actors {timings['ray']:.3f} s   "
          f"ratio {timings['ray'] / timings['spawn']:.3f}x (target <= 1.1x)")
    print(f"  start of the ranks        spawn peer {peer_start:.1f} s   Ray actors {actors_start:.1f} s")
    print(f"  private Ray cluster       start {ray_start:.1f} s (session {session.runtime.started_s:.1f} s), "
          f"daemons' RSS {daemons:.0f} MB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    main(a.rows, a.repeats)
