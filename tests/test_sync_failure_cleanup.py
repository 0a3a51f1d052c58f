"""A weight sync that fails leaves nothing in /dev/shm: a rank killed mid-sync gets the buffers of its whole
group (the healthy ranks' included) and of the weight relays removed by the controller, on every node; and
a later job of the same run removes what an earlier, killed job left, never another run's or user's files.

The checks look at exactly this run's files: names that carry the run's tag, created by this run's actors
(other processes on the machine may have buffers of their own there)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nemo_prorl.config import load_config
from nemo_prorl.policy import POLICY_BACKENDS
from tests.conftest import TINY_OVERRIDES
from tests.test_cluster_ray import _gone, two_nodes  # noqa: F401  (the module's two simulated nodes)

SHM = Path("/dev/shm")


def _files_of(pids: set[int]) -> set[str]:
    """Transfer-buffer files created by these processes (the creator's pid is part of every name)."""
    return {p.name for p in SHM.glob("prorl-weights-*") if any(f"-{pid}-" in p.name for pid in pids)}


def _kill_when_buffers_appear(owners: set[int], need: int, victim: int, seen: list, stop: threading.Event) -> None:
    """SIGKILL `victim` as soon as `need` buffer files of `owners` exist: the sync is under way, its buckets
    not yet loaded (the controller drives one round trip per bucket)."""
    while not stop.is_set():
        files = _files_of(owners)
        if len(files) >= need:
            seen.extend(sorted(files))
            os.kill(victim, signal.SIGKILL)
            return
        time.sleep(0.002)


def _sync_with_a_killed_process(policy, engines, owners: set[int], need: int, victim: int, named: str) -> list[str]:
    """Run a sync with many small buckets while `victim` is killed mid-way (the error must name it: `named`);
    the buffer files seen then."""
    from nemo_prorl.cluster.actors import ActorError
    from nemo_prorl.weight_sync import sync_weights

    seen: list[str] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_when_buffers_appear, args=(owners, need, victim, seen, stop), daemon=True)
    killer.start()
    try:
        with pytest.raises(ActorError, match=f"{named} on node .* died during sync_"):
            sync_weights(policy, engines, bucket_mb=0.001)  # one module per bucket: dozens of round trips
    finally:
        stop.set()
        killer.join()
    assert seen, "no transfer buffer appeared during the sync"
    return seen


def _cfg(two_nodes, model_dir: Path, out: Path, *extra: str):  # noqa: F811
    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={model_dir}", "policy=megatron", "cluster.num_nodes=2",
                          "cluster.cpu_slots_per_node=1", f"cluster.ray_address={two_nodes.address}",
                          f"trainer.output_dir={out}", *extra])
    return cfg


def _assert_only_this_runs_names(seen: list[str], out: Path) -> None:
    from nemo_prorl.cluster.shm import run_prefix

    prefix = run_prefix(str(out))
    assert all(name.startswith(prefix) for name in seen), (prefix, seen)
    assert not [p for p in SHM.glob(prefix + "*")], "a buffer of this run is left"


def test_a_rank_killed_mid_sync_leaves_no_buffer_of_its_group(two_nodes, tiny_model_dir, tmp_path):  # noqa: F811
    """Colocated, DP over two nodes: each node's rank fills its node's buffer. Rank 1 is killed while the
    buckets are being loaded: the sync fails naming it, and neither its buffer nor the healthy rank 0's is
    left (the group is killed, so the ranks cannot remove their own)."""
    from nemo_prorl.rollout import ROLLOUT_ENGINES

    cfg = _cfg(two_nodes, tiny_model_dir, tmp_path / "run", "policy.megatron.data_parallel_size=2",
               "rollout.num_engines=2")
    policy = POLICY_BACKENDS.get("megatron")(cfg, tiny_model_dir)
    engines = ROLLOUT_ENGINES.get("torch")(cfg, tiny_model_dir)
    try:
        pids = [i["pid"] for i in policy.group.call_all("node_info", timeout_s=60)]
        ranks = set(pids)
        seen = _sync_with_a_killed_process(policy, engines, ranks, 2, pids[1], "megatron rank 1")
        assert len(seen) == 2  # a buffer per node, the healthy rank's among them
        assert _files_of(ranks) == set(), "the failed sync left its buffers in /dev/shm"
        _assert_only_this_runs_names(seen, tmp_path / "run")
    finally:
        engines.close()
        policy.close()
    _gone("MegatronRank", "TorchEngineServer")


def test_split_mode_a_rank_killed_mid_sync_leaves_no_relay_buffer(two_nodes, tiny_model_dir, tmp_path):  # noqa: F811
    """Split mode: node 1's weight relay fills that node's buffer from the rank on node 0. The rank is killed
    mid-sync: the relay (alive, but its transport peers gone) is stopped and its buffer removed."""
    from nemo_prorl.rollout import ROLLOUT_ENGINES
    from nemo_prorl.weight_sync.sync import weight_relays

    cfg = _cfg(two_nodes, tiny_model_dir, tmp_path / "run", "cluster.rollout_nodes=1")
    policy = POLICY_BACKENDS.get("megatron")(cfg, tiny_model_dir)
    engines = ROLLOUT_ENGINES.get("torch")(cfg, tiny_model_dir)
    try:
        relays = weight_relays(engines, [1])  # started here (the sync reuses them) so that their pid is known
        relay = relays.call_all("node_info", timeout_s=60)[0]["pid"]
        rank = policy.group.call_all("node_info", timeout_s=60)[0]["pid"]
        seen = _sync_with_a_killed_process(policy, engines, {relay}, 1, rank, "megatron rank 0")
        assert _files_of({relay, rank}) == set(), "the failed sync left the relay's buffer in /dev/shm"
        _assert_only_this_runs_names(seen, tmp_path / "run")
    finally:
        engines.close()
        policy.close()
    _gone("MegatronRank", "TorchEngineServer", "WeightRelay")


# ---------------------------------------------------------------- a later job of the same run

_HOLD = """
import sys, time, torch
from nemo_prorl.weight_sync.buffer import TransferBuffer
buf = TransferBuffer(torch.device("cpu"), tag=sys.argv[1])
buf.ensure(4096)
print(buf.handle[1], flush=True)
time.sleep(600)
"""


def _holder(tag: str) -> tuple[subprocess.Popen, Path]:
    """A process of run `tag` holding a transfer buffer (a rank between two buckets); its file."""
    p = subprocess.Popen([sys.executable, "-c", _HOLD, tag], stdout=subprocess.PIPE, text=True)
    return p, Path(p.stdout.readline().strip())


def _leftover(tag: str) -> Path:
    """The buffer of a process of run `tag` killed while it held it: what a killed job leaves."""
    p, path = _holder(tag)
    p.kill()
    p.wait()
    assert path.is_file()
    return path


def test_a_new_job_of_the_same_run_removes_what_a_killed_job_left(tmp_path):
    """The first buffer a job's process creates clears the node's leftovers of the same run (a creator that
    no longer lives); it never removes a buffer of another run, of another user, or one still held."""
    from nemo_prorl.cluster.shm import run_tag

    tag, other = run_tag(str(tmp_path / "run")), run_tag(str(tmp_path / "other"))
    assert tag != other and run_tag(str(tmp_path / "run") + "/") == tag  # the run is its folder
    mine, theirs = _leftover(tag), _leftover(other)
    held, held_path = _holder(tag)  # a live process of the same run (e.g. a rank of a job still running)
    foreign = SHM / mine.name.replace(mine.name.split("-")[4], "0" * 16)  # same name pattern, another owner
    if os.geteuid() == 0:  # only root can make a file of another user
        foreign.write_bytes(b"")
        os.chown(foreign, 12345, 12345)
    try:
        subprocess.run([sys.executable, "-c", _HOLD.replace("time.sleep(600)", "buf.close()"), tag], check=True,
                       capture_output=True, timeout=120)
        assert not mine.exists(), "the killed job's buffer is still there"
        assert theirs.is_file() and held_path.is_file()
        assert foreign.is_file() or os.geteuid() != 0
    finally:
        held.kill()
        held.wait()
        for p in (mine, theirs, held_path, foreign):
            p.unlink(missing_ok=True)


def test_transfer_buffers_are_named_after_their_run():
    from nemo_prorl.cluster.shm import run_prefix, run_tag
    from nemo_prorl.weight_sync.buffer import TransferBuffer

    buf = TransferBuffer(torch.device("cpu"), tag=run_tag("/some/run"))
    try:
        buf.ensure(64)
        assert Path(buf.handle[1]).name.startswith(f"{run_prefix('/some/run')}{os.getpid()}-")
        assert Path(buf.handle[1]).stat().st_mode & 0o777 == 0o600
    finally:
        buf.close()
