"""The runtime on real Ray, with two simulated nodes (`ray.cluster_utils.Cluster`) on this machine: loopback
only, token authentication, Megatron ranks placed on different nodes, the trainer on two nodes equal to the
single-machine run, and a killed rank: a named error, no process left, and an exact resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from nemo_prorl import cluster
from nemo_prorl.config import load_config
from nemo_prorl.policy import POLICY_BACKENDS
from tests.checks import assert_every_step_updated, assert_same_state, assert_update_matches
from tests.conftest import TINY_OVERRIDES, VLLM_PYTHON

NOISY = ("time/", "throughput/gen")


def _ours() -> list[psutil.Process]:
    """This test session's descendants (Ray's daemons and workers among them)."""
    return psutil.Process().children(recursive=True)


def _actors(kind: str) -> list[psutil.Process]:
    out = []
    for p in _ours():
        try:
            if p.cmdline() and p.cmdline()[0].startswith(f"ray::{kind}"):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _gone(*kinds: str, within_s: float = 120) -> None:
    """Wait until no actor process of these kinds is left (Ray ends them asynchronously after a kill)."""
    deadline = time.monotonic() + within_s
    while any(_actors(k) for k in kinds):
        assert time.monotonic() < deadline, [p.cmdline() for k in kinds for p in _actors(k)]
        time.sleep(0.2)


def _listening(procs) -> list[tuple[str, int, str]]:
    out = []
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((c.laddr.ip, c.laddr.port, p.name()))
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a worker node, one CPU slot each, on loopback, with the session's token."""
    import ray
    from ray.cluster_utils import Cluster

    from nemo_prorl.cluster.runtime import loopback_only

    cluster.close_session()  # a private cluster of an earlier test
    temp, ray_tmpdir = tempfile.mkdtemp(prefix="prorl-2n-"), os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp
    os.environ["RAY_worker_niceness"] = "0"  # as the launchers start Ray (see runtime.NORMAL_PRIORITY)
    loopback_only()
    node = dict(num_cpus=4, resources={"prorl_slot": 1}, object_store_memory=150 * 2**20)
    c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    c.add_node(**node)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    cluster.close_session()
    ray.shutdown()
    c.shutdown()
    shutil.rmtree(temp, ignore_errors=True)  # Ray's session files of both nodes (about 2 MB)
    if ray_tmpdir is None:  # later tests' Ray must not recreate the removed folder
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = ray_tmpdir


def test_the_cluster_binds_loopback_only_and_refuses_clients_without_the_token(two_nodes):
    ports = _listening(_ours())
    assert ports and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _, _ in ports), ports
    probe = ("import ray, sys\ntry:\n    ray.init(address=sys.argv[1], log_to_driver=False)\nexcept Exception as e:\n"
             "    print('REFUSED', type(e).__name__, e)\nelse:\n    print('JOINED', len(ray.nodes()))\n")

    def join(**env):
        e = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        out = subprocess.run([sys.executable, "-c", probe, two_nodes.address], env={**e, **env}, capture_output=True,
                             text=True, timeout=120)
        return out.stdout + out.stderr

    assert "REFUSED" in join(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)  # a wrong token
    assert "REFUSED" in join()  # no token at all
    assert "JOINED 2" in join(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=os.environ["RAY_AUTH_TOKEN_PATH"])


def _stray_connections(stop: threading.Event, hits: list) -> None:
    """Connect to every port the ranks listen on (the torch.distributed store, gloo) and to Ray's, send junk."""
    while not stop.is_set():
        for ip, port, _ in _listening(_actors("MegatronRank") + _ours()[:4]):
            try:
                with socket.create_connection((ip.replace("::ffff:", ""), port), timeout=0.2) as s:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(64))
                    hits.append(port)
            except OSError:
                pass
        time.sleep(0.05)


@pytest.mark.parametrize("layout", ["tensor_parallel_size=2", "data_parallel_size=2"])
def test_megatron_ranks_on_two_nodes_update_like_transformers(two_nodes, tiny_model_dir, layout):
    from tests.test_megatron_policy import _batch_and_loss

    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", "policy=megatron", f"policy.megatron.{layout}",
                          "cluster.num_nodes=2", "cluster.cpu_slots_per_node=1", f"cluster.ray_address={two_nodes.address}",
                          "policy.optim.eps=1.0", "policy.optim.lr=0.1", "policy.optim.weight_decay=0.0",
                          "policy.megatron.micro_batch_tokens=48"])
    batch, loss = _batch_and_loss(cfg, tiny_model_dir)
    hf = POLICY_BACKENDS.get("hf")(cfg, tiny_model_dir)
    before = hf.logprobs(batch, temperature=1.0)
    hf_metrics = hf.train_minibatch(batch, loss, temperature=1.0)
    stop, hits = threading.Event(), []
    scanner = threading.Thread(target=_stray_connections, args=(stop, hits), daemon=True)
    scanner.start()  # a port scan during start-up must not break it
    try:
        policy = POLICY_BACKENDS.get("megatron")(cfg, tiny_model_dir)
    finally:
        stop.set()
        scanner.join()
    try:
        infos = policy.group.call_all("node_info", timeout_s=60)
        assert len({i["node_id"] for i in infos}) == 2  # one rank on each node
        assert hits  # the scan reached open ports
        torch.testing.assert_close(policy.logprobs(batch, temperature=1.0), before, atol=1e-5, rtol=0)
        m = policy.train_minibatch(batch, loss, temperature=1.0)
        weights = dict(policy.named_weights())
    finally:
        policy.close()
    assert_update_matches(m, hf_metrics, weights, hf.model.state_dict())
    _gone("MegatronRank")  # closed: no rank left


# ---------------------------------------------------------------- prorl train on two nodes

def _train(model_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    from tests.conftest import VLLM_TINY

    args = [*VLLM_TINY, f"model.path={model_dir}", f"trainer.output_dir={out}", f"rollout.vllm.python={VLLM_PYTHON}",
            "policy=megatron", "policy.megatron.data_parallel_size=2", "trainer.num_steps=3",
            "trainer.checkpoint_every_n_steps=1", "trainer.keep_last_checkpoints=5", "validation.every_n_steps=2",
            "trainer.plot=false", "trainer.tensorboard=false", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, "-m", "nemo_prorl.cli", "train", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _rows(out: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(NOISY)}
            for r in map(json.loads, open(out / "metrics.jsonl"))}


def _kill_after_checkpoint(proc: subprocess.Popen, run: Path, step: int, kind: str) -> tuple[str, float]:
    """Kill the last actor of `kind` once checkpoint `step` is complete: the trainer's stderr and how long
    it took to stop."""
    deadline = time.monotonic() + 600
    while not (run / "checkpoints" / f"step_{step:06d}" / "COMPLETE").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    _actors(kind)[-1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 4, err[-3000:]
    _gone("MegatronRank", "EngineServer")  # nothing left running
    print("stopped with:", *[line for line in err.splitlines() if " during " in line][:3], sep="\n  ")
    return err, time.monotonic() - killed


@pytest.mark.skipif(not VLLM_PYTHON, reason="no vLLM interpreter (PRORL_VLLM_PYTHON; make vllm-env)")
def test_prorl_train_on_two_nodes_equals_one_machine_and_survives_killed_actors(two_nodes, vllm_model_dir, tmp_path):
    """Megatron DP=2 and a vLLM engine on each of two nodes (weights synced node-locally) trains exactly as
    one machine with one engine; a killed rank, then a killed engine, stop the run with a named error and
    resume=auto continues exactly."""
    on_two = ["cluster.num_nodes=2", "cluster.cpu_slots_per_node=1", f"cluster.ray_address={two_nodes.address}",
              "rollout.num_engines=2"]
    # the reference: one machine, one engine, the trainer's own private Ray
    single = _train(vllm_model_dir, tmp_path / "single", "rollout.num_engines=1")
    out, err = single.communicate(timeout=900)
    assert single.returncode == 0, err[-3000:]
    expected = _rows(tmp_path / "single")
    assert sorted(expected) == [0, 1, 2, 3] and any("val/pass@1" in r for r in expected.values())
    assert_every_step_updated(expected.values())
    # rewards of several domains (the synthetic tasks: exact-match and arithmetic verifiers)
    assert len({k for k in expected[1] if k.split("/")[-1] in ("reverse", "sort", "arithmetic")}) >= 2
    # the same run on two nodes with two engines: identical metrics, and no weight byte across nodes
    whole = _train(vllm_model_dir, tmp_path / "whole", *on_two)
    out, err = whole.communicate(timeout=900)
    assert whole.returncode == 0, err[-3000:]
    rows = _rows(tmp_path / "whole")
    assert all(rows[s].pop("sync/cross_node_megabytes") == 0.0 for s in (1, 2, 3))
    assert all(rows[s]["sync/megabytes"] == 2 * expected[s]["sync/megabytes"] for s in (1, 2, 3))  # 1 copy per node
    for s in (1, 2, 3):
        rows[s]["sync/megabytes"] = expected[s]["sync/megabytes"]
        expected[s].pop("sync/cross_node_megabytes")
    assert rows == expected
    assert (tmp_path / "whole" / "vllm_engine_1.log").is_file()
    # a rank killed during step 2, then an engine during step 3 (whichever command reaches it first: on a
    # loaded machine the kill can land after the generation): named errors soon after; resumes exactly
    run = tmp_path / "run"
    err, stopped_s = _kill_after_checkpoint(_train(vllm_model_dir, run, *on_two), run, 1, "MegatronRank")
    assert re.search(r"megatron rank \d on node \d \(.*pid \d+\) died during (logprobs|train_minibatch|sync_\w+|"
                     r"save_state)", err) and "resume with resume=auto" in err, [x for x in err.splitlines() if " during " in x]
    print(f"killed rank -> trainer stopped with a named error in {stopped_s:.1f}s")
    err, stopped_s = _kill_after_checkpoint(_train(vllm_model_dir, run, *on_two, "resume=auto"), run, 2, "EngineServer")
    assert re.search(r"vllm engine \d on node \d \(.*pid \d+\) died during (generate|sleep|\w+weight_update|load_bucket)",
                     err) and "resume with resume=auto" in err, [line for line in err.splitlines() if " during " in line]
    print(f"killed engine -> trainer stopped with a named error in {stopped_s:.1f}s")
    resumed = _train(vllm_model_dir, run, *on_two, "resume=auto")
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    assert _rows(run) == _rows(tmp_path / "whole")
    last = Path("checkpoints") / "step_000003"
    assert (run / last / "megatron").is_dir()
    assert_same_state(tmp_path / "whole" / last, run / last, _policy_for(vllm_model_dir, on_two))


def _policy_for(model_dir: Path, on_two: list[str]):
    from tests.conftest import VLLM_TINY

    cfg, _ = load_config([*VLLM_TINY, f"model.path={model_dir}", "policy=megatron", "rollout=torch",
                          "policy.megatron.data_parallel_size=2", *on_two[:-1]])
    return _Closing(POLICY_BACKENDS.get("megatron")(cfg, model_dir))


class _Closing:
    """A policy for assert_same_state that closes once both checkpoints are loaded."""

    def __init__(self, policy) -> None:
        self.policy, self.loads = policy, 0

    def load_state(self, path: Path) -> None:
        self.policy.load_state(path)

    def state_dict(self):
        state = self.policy.state_dict()
        self.loads += 1
        if self.loads == 2:
            self.policy.close()
        return state


def test_a_missing_node_is_named_after_the_wait(two_nodes, tiny_model_dir):
    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", "policy=megatron", "cluster.num_nodes=3",
                          "cluster.cpu_slots_per_node=1", f"cluster.ray_address={two_nodes.address}",
                          "cluster.ray_timeout_s=3"])
    cluster.close_session()
    with pytest.raises(cluster.RayStartError, match=r"only 2 of cluster.num_nodes=3 nodes with 1 prorl_slot joined "
                                                    r"the Ray cluster within 3s; alive: 127.0.0.1"):
        POLICY_BACKENDS.get("megatron")(cfg, tiny_model_dir)
    assert _actors("MegatronRank") == []


def test_attaching_to_a_cluster_without_token_authentication_is_refused(tmp_path):
    """A cluster that serves clients without a token is refused by name, before the trainer joins it."""
    short = Path(tempfile.mkdtemp(prefix="prorl-na-"))  # Ray's socket paths must stay under 108 bytes
    try:
        _refused_without_auth(tmp_path, short)
    finally:
        import shutil

        shutil.rmtree(short, ignore_errors=True)


def _refused_without_auth(tmp_path: Path, short: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--include-dashboard=false", "--num-cpus=1", "--object-store-memory=80000000",
                             f"--temp-dir={short / 'ray'}", "--block"], env=env, stdout=open(tmp_path / "head.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = ("import sys\nfrom nemo_prorl.cluster.runtime import attach\ntry:\n"
                "    attach(sys.argv[1], sys.argv[2], timeout_s=120)\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
        out = subprocess.run([sys.executable, "-c", code, f"127.0.0.1:{port}", os.environ["RAY_AUTH_TOKEN_PATH"]],
                             env={**os.environ, "RAY_TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=300)
        assert "RayStartError" in out.stdout and "does not require its token" in out.stdout, \
            out.stdout + out.stderr + (tmp_path / "head.log").read_text()[-2000:]
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        head.wait(60)
    _gone_session(short / "ray")


def _gone_session(temp: Path, within_s: float = 60) -> None:
    """No process of the Ray session under `temp` is left."""
    deadline = time.monotonic() + within_s
    while True:
        left = []
        for p in psutil.process_iter(["cmdline"]):
            if str(temp) in " ".join(p.info["cmdline"] or []):
                left.append(p)
        if not left:
            return
        if time.monotonic() > deadline:
            for p in left:
                p.kill()
            raise AssertionError(f"left running: {[p.info['cmdline'][:2] for p in left]}")
        time.sleep(0.5)


# ---------------------------------------------------------------- engines on every node, node-local sync

@pytest.mark.parametrize("layout,cross", [("data_parallel_size=2", False), ("tensor_parallel_size=2", True)])
def test_each_node_syncs_its_engine_from_its_own_ranks(two_nodes, tiny_model_dir, layout, cross, monkeypatch):
    """Megatron over two nodes, a torch engine actor on each: after a training step each engine samples
    with the policy's new weights (its logprobs match the policy's), the weights never pass through the
    controller, and with DP over the nodes (a whole replica on each) not one byte crosses nodes; with TP
    across the nodes, exactly the half of each layer a node lacks does."""
    from transformers import AutoTokenizer

    from nemo_prorl.policy.megatron import MegatronPolicy
    from nemo_prorl.rollout import ROLLOUT_ENGINES, SamplingParams
    from nemo_prorl.trainer.batching import build_batch
    from nemo_prorl.weight_sync import sync_weights
    from tests.test_megatron_policy import _batch_and_loss

    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", "policy=megatron", f"policy.megatron.{layout}",
                          "cluster.num_nodes=2", "cluster.cpu_slots_per_node=1", f"cluster.ray_address={two_nodes.address}",
                          "rollout.num_engines=2", "policy.optim.lr=0.05"])
    batch, loss = _batch_and_loss(cfg, tiny_model_dir)

    def through_the_controller(self):
        raise AssertionError("weights were gathered in the controller")

    monkeypatch.setattr(MegatronPolicy, "lazy_weights", through_the_controller)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok.encode(f"count to {i}") for i in range(6)]
    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_tokens=8, stop_token_ids=(tok.eos_token_id,), seed=1)
    shm_before = set(Path("/dev/shm").glob("prorl-weights-*"))
    policy = POLICY_BACKENDS.get("megatron")(cfg, tiny_model_dir)
    engines = ROLLOUT_ENGINES.get("torch")(cfg, tiny_model_dir)
    try:
        nodes = {i["node_id"] for i in engines.group.call_all("node_info", timeout_s=60)}
        assert engines.engine_nodes() == [0, 1] and len(nodes) == 2

        def gap() -> float:
            comps = engines.generate(prompts, params)
            b = build_batch(prompts, comps, tok.pad_token_id)
            lp = policy.logprobs(b, temperature=1.0)
            return float(((lp - b["rollout_logprobs"]).abs() * b["response_mask"]).max())

        policy.train_minibatch(batch, loss, temperature=1.0)
        assert gap() > 1e-2  # the engines still have the starting weights: the check can fail
        stats = sync_weights(policy, engines, bucket_mb=0.05)
        assert gap() < 1e-4
        # the nodes' buffers stay mapped for the next sync, but no file is left behind (even if killed now)
        assert set(Path("/dev/shm").glob("prorl-weights-*")) <= shm_before
        shard_bytes = {k: sum(torch.Size(shape).numel() * 4 for _, shape, _ in m)
                       for k, m in policy.shard_layout()[2].items()}
    finally:
        engines.close()
        policy.close()
    hf = POLICY_BACKENDS.get("hf")(cfg, tiny_model_dir)
    assert stats.num_bytes == 2 * sum(t.numel() * t.element_size() for _, t in hf.named_weights())  # a copy per node
    assert stats.num_buckets > 1
    print(f"{layout}: {stats.num_bytes / 2**20:.2f} MB into 2 nodes' buffers, {stats.cross_node_bytes / 2**20:.3f} MB "
          f"across nodes, {stats.seconds:.2f}s")
    if cross:  # each node's leader receives the other node's TP shard, whole
        assert stats.cross_node_bytes == sum(shard_bytes.values()) > 0
    else:
        assert stats.cross_node_bytes == 0
    _gone("MegatronRank", "TorchEngineServer")


def test_rewards_are_scored_on_every_node_and_a_dead_worker_is_replaced(two_nodes, tiny_model_dir):
    """cluster.rewards_on_every_node (default on two nodes): a reward-worker actor per node scores its share
    of the rows, with the same results as the controller's own RewardSuite; a worker killed between two
    steps is replaced and no row is lost."""
    from nemo_prorl.cluster.rewards import NodeRewardSuite, reward_suite
    from nemo_prorl.rewards import RewardInput, RewardSuite

    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", "cluster.num_nodes=2",
                          "cluster.cpu_slots_per_node=1", f"cluster.ray_address={two_nodes.address}",
                          "policy=megatron"])
    rows = [("math", RewardInput(response=f"so \\boxed{{{i}}}", ground_truth=str(i % 3))) for i in range(6)]
    rows += [("exact_match", RewardInput(response=f"{i}21", ground_truth="121")) for i in range(3)]
    rows += [("no_such_reward", RewardInput(response="x", ground_truth="x"))]
    names, inputs = [n for n, _ in rows], [x for _, x in rows]
    local = RewardSuite(cfg.reward)
    try:
        expected = [(r.reward, r.status) for r in local.score_batch(names, inputs)]
    finally:
        local.close()
    assert [r for r, _ in expected[:6]] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0] and expected[-1][1] == "error"
    suite = reward_suite(cfg)
    try:
        assert isinstance(suite, NodeRewardSuite)
        infos = [g.call_all("node_info", timeout_s=60)[0] for g in suite.workers]
        assert len({i["node_id"] for i in infos}) == 2  # one worker on each node
        assert [(r.reward, r.status) for r in suite.score_batch(names, inputs)] == expected
        victim = [p for p in _actors("RewardNode") if p.pid == infos[1]["pid"]]
        assert victim
        victim[0].send_signal(signal.SIGKILL)
        victim[0].wait(60)
        assert [(r.reward, r.status) for r in suite.score_batch(names, inputs)] == expected  # every row scored
        assert suite.replaced == 1
    finally:
        suite.close()
    _gone("RewardNode")


def test_split_mode_a_rollout_node_gets_the_weights_through_its_relay(two_nodes, tiny_model_dir, monkeypatch):
    """cluster.rollout_nodes=1: node 0 trains, node 1 only generates. Node 1 has no rank, so a weight relay
    there receives every shard from the ranks (point-to-point, gloo) and fills the node's buffer; the
    engine then samples with the trained weights, sync after sync, and the controller never holds them."""
    from transformers import AutoTokenizer

    from nemo_prorl.policy.megatron import MegatronPolicy
    from nemo_prorl.rollout import ROLLOUT_ENGINES, SamplingParams
    from nemo_prorl.trainer.batching import build_batch
    from nemo_prorl.weight_sync import sync_weights
    from nemo_prorl.weight_sync.sync import weight_relays
    from tests.test_megatron_policy import _batch_and_loss

    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", "policy=megatron", "cluster.num_nodes=2",
                          "cluster.cpu_slots_per_node=1", "cluster.rollout_nodes=1",
                          f"cluster.ray_address={two_nodes.address}", "policy.optim.lr=0.05"])
    batch, loss = _batch_and_loss(cfg, tiny_model_dir)
    monkeypatch.setattr(MegatronPolicy, "lazy_weights", lambda self: (_ for _ in ()).throw(AssertionError("controller")))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok.encode(f"count to {i}") for i in range(4)]
    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_tokens=8, stop_token_ids=(tok.eos_token_id,), seed=1)
    policy = POLICY_BACKENDS.get("megatron")(cfg, tiny_model_dir)
    engines = ROLLOUT_ENGINES.get("torch")(cfg, tiny_model_dir)
    try:
        assert engines.engine_nodes() == [1] and policy.rank_nodes == [0]

        def gap() -> float:
            comps = engines.generate(prompts, params)
            b = build_batch(prompts, comps, tok.pad_token_id)
            lp = policy.logprobs(b, temperature=1.0)
            return float(((lp - b["rollout_logprobs"]).abs() * b["response_mask"]).max())

        for _ in range(2):  # the second sync reuses the relay and its transport group
            policy.train_minibatch(batch, loss, temperature=1.0)
            assert gap() > 1e-2
            stats = sync_weights(policy, engines, bucket_mb=0.05)
            assert gap() < 1e-4
        relay = weight_relays(engines, [1]).call_all("node_info", timeout_s=60)[0]
        engine = engines.group.call_all("node_info", timeout_s=60)[0]
        assert relay["node_id"] == engine["node_id"]  # the relay sits on the engine's node
        whole = sum(torch.Size(shape).numel() * 4 for m in policy.shard_layout()[2].values() for _, shape, _ in m)
    finally:
        engines.close()
        policy.close()
    assert stats.cross_node_bytes == whole  # every shard crossed, once
    _gone("MegatronRank", "TorchEngineServer", "WeightRelay")


# ---------------------------------------------------------------- a mixture-of-experts policy on two nodes

MOE_TINY = ["model.tiny.architecture=qwen3_moe", "model.tiny.num_experts=4", "model.tiny.num_experts_per_tok=2",
            "model.tiny.moe_intermediate_size=32", "model.tiny.head_dim=32"]


@pytest.mark.skipif(not VLLM_PYTHON, reason="no vLLM interpreter (PRORL_VLLM_PYTHON; make vllm-env)")
def test_prorl_train_moe_with_expert_parallelism_and_routing_replay_resumes_exactly(two_nodes, tmp_path_factory,
                                                                                    tmp_path):
    """A tiny Qwen3-MoE trained by `prorl train` with Megatron EP=2 (each rank, on its own node, holds half the
    experts), a vLLM engine on each node that returns the experts it chose, and the trainer replaying them:
    every step updates, the routing reached the trainer (the replayed and fresh-routing mismatch are both
    logged), the weights reach the engines from their own node; a rank killed after the first checkpoint
    stops the run with a named error, and resume=auto ends where the uninterrupted run does."""
    from tests.conftest import VLLM_TINY

    from nemo_prorl.demo.warmstart import warm_started_model

    cfg, _ = load_config([*VLLM_TINY, *MOE_TINY, f"model.warm_start.cache_dir={tmp_path_factory.mktemp('moe_ws')}"])
    model_dir = warm_started_model(cfg)
    moe = [*MOE_TINY, "cluster.num_nodes=2", "cluster.cpu_slots_per_node=1", f"cluster.ray_address={two_nodes.address}",
           "rollout.num_engines=2", "policy.megatron.expert_parallel_size=2", "rollout.routing_replay=true",
           "trainer.num_steps=2", "validation.every_n_steps=100"]
    whole = _train(model_dir, tmp_path / "whole", *moe)
    out, err = whole.communicate(timeout=900)
    assert whole.returncode == 0, err[-3000:]
    expected = _rows(tmp_path / "whole")
    assert {1, 2} <= set(expected), sorted(expected)
    steps = [expected[s] for s in (1, 2)]
    assert_every_step_updated(steps)
    # Each node's engine gets the dense shards and its own rank's experts from that rank; only the experts
    # the node's rank does not hold (the other half, on the other node) cross: all experts once in total.
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        expert_mb = sum(f.get_tensor(k).nbytes for k in f.keys() if ".experts." in k) / 2**20
    for r in steps:
        assert r["sync/cross_node_megabytes"] == pytest.approx(expert_mb, rel=1e-6), (r["sync/cross_node_megabytes"],
                                                                                       expert_mb)
        assert "mismatch/k3_kl" in r and "mismatch/no_replay_k3_kl" in r, sorted(k for k in r if "mismatch" in k)
    run = tmp_path / "run"
    err, _ = _kill_after_checkpoint(_train(model_dir, run, *moe), run, 1, "MegatronRank")
    assert re.search(r"megatron rank \d on node \d \(.*pid \d+\) died during", err) and "resume with resume=auto" in err
    resumed = _train(model_dir, run, *moe, "resume=auto")
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    assert _rows(run) == expected
