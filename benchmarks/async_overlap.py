"""Asynchronous steps against synchronous ones, side by side in one run, on this CPU.

  1. split: policy=megatron on simulated node 0 and a torch engine on simulated node 1 (cluster.rollout_nodes=1,
     a loopback Ray cluster of two nodes), each limited to one thread, with a model and batch where
     generation and the update take similar time. Step time (trainer seconds per step, steps 3..N) with
     algo.async.max_staleness 0 and 1. Target: k=1 at least 1.6x faster (2x is the limit: two phases of
     equal length overlapped).
  2. embedded: the embedded default (`make run`: hf policy, torch engine; 120 steps) with k = 0 as it runs
     (one process, torch's threads over every core) and k = 1 (the engine runs as an actor of its own;
     one thread for the trainer and one for the engine, so both sides use the machine's two cores): wall
     time and final validation pass@1 (target: within 0.03 of the synchronous run).

    python benchmarks/async_overlap.py [--only split|embedded] [--steps 10] [--embedded-steps 120]

Each configuration runs as its own `prorl train` process; the figures come from its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# An untrained tiny model answers at full length: generating 48 tokens for 16 x 4 samples and the update
# over them take about as long on one thread each (the overlong penalty gives its groups a signal).
SPLIT_MODEL = ["model.tiny.hidden_size=128", "model.tiny.intermediate_size=384", "model.tiny.num_hidden_layers=4",
               "model.warm_start.enabled=false"]
SPLIT = ["policy=megatron", "cluster.num_nodes=2", "cluster.cpu_slots_per_node=1", "cluster.rollout_nodes=1",
         "cluster.num_threads=1", "rollout.engine=torch", "algo.num_prompts_per_step=16",
         "algo.num_generations_per_prompt=4", "algo.num_prompts_per_minibatch=8", "rollout.max_response_length=48",
         "algo.dynamic_sampling.enabled=false", "validation.every_n_steps=0", "trainer.tensorboard=false",
         "trainer.plot=false", "trainer.progress_bar=false", "reward.overlong.enabled=true",
         "reward.overlong.buffer_length=16", "algo.rollout_correction.mode=tis"]


def _train(args: list[str], log: Path, env: dict[str, str]) -> float:
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "nemo_prorl.cli", "train", *args], stdout=f,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"prorl train failed ({log}):\n" + log.read_text()[-3000:])
    return time.monotonic() - t0


def _rows(out: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if "reward/mean" in r]


def _two_nodes(work: Path) -> tuple[Any, dict[str, str]]:
    """A head and a worker node on loopback, one CPU slot each, with a token (as tests/test_cluster_ray.py)."""
    from nemo_prorl.cluster.runtime import auth_env, loopback_only, write_token

    env = auth_env(write_token(work / "token"))
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(env)
    os.environ["RAY_TMPDIR"] = str(work / "ray")
    loopback_only()
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=4, resources={"prorl_slot": 1}, object_store_memory=200 * 2**20)
    c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    c.add_node(**node)
    c.wait_for_nodes()
    return c, dict(os.environ)


def split(work: Path, steps: int) -> dict[str, Any]:
    cluster, env = _two_nodes(work)
    out: dict[str, Any] = {}
    try:
        for k in (0, 1):
            run = work / f"split_k{k}"
            wall = _train([*SPLIT_MODEL, *SPLIT, f"cluster.ray_address={cluster.address}",
                           f"model.warm_start.cache_dir={work / 'warm'}", f"trainer.num_steps={steps}",
                           f"trainer.checkpoint_every_n_steps={steps + 1}", f"trainer.output_dir={run}",
                           f"algo.async.max_staleness={k}"], work / f"split_k{k}.log", env)
            rows = _rows(run)[2:]  # steps 3..N: past the start-up
            mean = lambda key: sum(r.get(key, 0.0) for r in rows) / len(rows)  # noqa: E731
            out[f"k{k}"] = {"step_s": mean("time/step"), "generate_s": mean("time/generate"),
                            "update_s": mean("time/update") + mean("time/logprobs"), "wall_s": wall,
                            "lag_max": max(r.get("async/version_lag_max", 0.0) for r in rows)}
    finally:
        cluster.shutdown()
    out["speedup"] = out["k0"]["step_s"] / out["k1"]["step_s"]
    return out


def embedded(work: Path, steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in (0, 1):
        run = work / f"embedded_k{k}"
        threads = ["cluster.num_threads=1"] if k else []  # k=1: a thread for the trainer, one for the engine
        wall = _train([f"trainer.output_dir={run}", f"trainer.num_steps={steps}", "trainer.progress_bar=false",
                       "trainer.plot=false", *threads, f"algo.async.max_staleness={k}"], work / f"embedded_k{k}.log",
                      dict(os.environ))
        rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
        vals = [r for r in rows if "val/pass@1" in r]
        out[f"k{k}"] = {"wall_s": wall, "pass@1_start": vals[0]["val/pass@1"], "pass@1_end": vals[-1]["val/pass@1"],
                        "step_s": sum(r["time/step"] for r in rows if "reward/mean" in r) / steps}
    out["pass@1_diff"] = out["k1"]["pass@1_end"] - out["k0"]["pass@1_end"]
    out["wall_ratio"] = out["k0"]["wall_s"] / out["k1"]["wall_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["split", "embedded"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--embedded-steps", type=int, default=120)
    ap.add_argument("--out", default="runs/bench/async_overlap.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prorl-async-bench-"))
    res: dict[str, Any] = {}
    if args.only in (None, "split"):
        res["split"] = s = split(work, args.steps)
        print("split (megatron on node 0, torch engine on node 1, 1 thread each), seconds per step, "
              f"steps 3..{args.steps}:")
        for k in ("k0", "k1"):
            print(f"  max_staleness={k[1]}: {s[k]['step_s']:.3f} s/step (generate phase {s[k]['generate_s']:.3f}, "
                  f"logprobs+update {s[k]['update_s']:.3f}, max lag {s[k]['lag_max']:.0f})")
        print(f"  speed-up k=1 over k=0: {s['speedup']:.2f}x (target >= 1.6x, limit 2x)")
    if args.only in (None, "embedded"):
        res["embedded"] = e = embedded(work, args.embedded_steps)
        print(f"embedded default, {args.embedded_steps} steps (k=0 as `make run`; k=1 one thread each for the trainer "
              "and the engine actor):")
        for k in ("k0", "k1"):
            print(f"  max_staleness={k[1]}: {e[k]['wall_s']:.0f} s wall, {e[k]['step_s']:.3f} s/step, "
                  f"pass@1 {e[k]['pass@1_start']:.3f} -> {e[k]['pass@1_end']:.3f}")
        print(f"  pass@1 k=1 - k=0: {e['pass@1_diff']:+.3f} (target within 0.03); "
              f"wall k=0 / k=1: {e['wall_ratio']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
