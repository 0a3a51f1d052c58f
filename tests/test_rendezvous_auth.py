"""The rendezvous of the Megatron ranks is closed to strangers (issue 29, item 3): a process of another uid
that knows every TCP port the ranks listen on can neither list, read nor write a key of the group, nor keep
it from starting and training. Real Ray (loopback, token), real megatron-core ranks over gloo, and a real
attacker: torch's own TCPStore client, run as uid 1000."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import megatron.core  # noqa: F401  a project dependency: fail, never skip, if it is missing
import psutil
import pytest

from nemo_prorl.config.loader import load_config
from nemo_prorl.policy import POLICY_BACKENDS
from tests.conftest import TINY_OVERRIDES

SETPRIV = shutil.which("setpriv")
STRANGER = 1000

# The attacker: every port it is told of, tried as a TCPStore client (the store of torch.distributed, as
# `init_process_group(init_method="tcp://...")` and our old rendezvous served it). On each: list the keys,
# read them, and write an "attacker" key at every prefix level it saw (the random prefix of the group
# included), then report what it got; a port that answered is tried again every round. It runs until told
# to stop, then has one more round.
ATTACKER = r"""
import datetime, json, os, sys, threading, time
import torch.distributed as dist
ports_file, stop_file = sys.argv[1], sys.argv[2]
done, results = set(), {}
def report(**kw):
    print(json.dumps(kw), flush=True)
def attack(port):
    got = results[port] = {"port": port, "at": time.time(), "connected": False, "keys": [], "read": {}, "wrote": []}
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=1),
                              wait_for_workers=False)
    except Exception as e:
        got["error"] = type(e).__name__
        return
    got["connected"] = True
    try:
        got["keys"] = store.list_keys()
    except Exception as e:
        got["list_error"] = type(e).__name__
    prefixes = {""} | {k.rsplit("/", i)[0] + "/" for k in got["keys"] for i in range(1, k.count("/") + 1)}
    for k in got["keys"][:50]:
        try:
            got["read"][k] = store.get(k).hex()[:64]
        except Exception as e:
            got["read"][k] = "error " + type(e).__name__
    for p in sorted(prefixes):
        try:
            store.set(p + "attacker", "pwned")
            got["wrote"].append(p + "attacker")
        except Exception as e:
            got.setdefault("write_errors", []).append(type(e).__name__)
def attack_all(ports):
    # a port that never answers (a peer's socket waiting for its own protocol) holds one thread, not the rest
    threads = [threading.Thread(target=attack, args=(p,), daemon=True) for p in ports]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    for p, t in zip(ports, threads):
        t.join(max(0.0, deadline - time.monotonic()))
        report(**results[p], hung=t.is_alive())
while True:
    stopping = os.path.exists(stop_file)  # then one last look at the list, and every port of it tried
    try:
        ports = json.load(open(ports_file))
    except Exception:
        ports = []
    # new ports, and again every port that answered as a store: its keys appear as the ranks write them
    again = [p for p in done if results.get(p, {}).get("connected")]
    new = [p for p in ports if p not in done]
    done.update(new)
    attack_all(new + again)
    if stopping:
        break
    time.sleep(0.5)
report(stopped=True, uid=os.getuid())
sys.stdout.flush()
os._exit(0)  # threads still stuck on a silent port: not waited for
"""


def _ours(names: tuple[str, ...]) -> list[psutil.Process]:
    """This test's Ray actors of the given classes: descendants of this process only (another test on the
    machine may run ranks of its own, which the attacker must not touch)."""
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if any(cmd.startswith(f"ray::{n}") for n in names):
            out.append(p)
    return out


def _listening_ports(procs: list[psutil.Process]) -> set[int]:
    """Every TCP port these processes listen on (their sockets' inodes against the kernel's table)."""
    ports = set()
    for p in procs:
        try:
            ports |= {c.laddr.port for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return ports


def _rank0_store_has_attacker_keys(policy) -> list[str]:
    """Which "attacker" keys rank 0 reads through the store of its process group (every level of it)."""
    import ray

    def probe(self):
        import torch.distributed.distributed_c10d as c10d

        found, store, level = [], c10d._get_default_store(), 0
        while store is not None:  # the group's store, and each store it wraps (the attacker wrote at every level)
            if store.check(["attacker"]):
                found.append(f"'attacker' in {type(store).__name__} (level {level})")
            store, level = getattr(store, "underlying_store", None), level + 1
        return found

    return ray.get(policy.group.actors[0].__ray_call__.remote(probe), timeout=120)


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None,
                    reason="needs root and setpriv to run the attacker as another uid")
def test_a_stranger_cannot_use_or_disturb_the_rendezvous(tiny_model_dir, tmp_path):
    from tests.test_megatron_policy import _batch_and_loss

    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", "policy=megatron",
                          "policy.megatron.tensor_parallel_size=2", f"trainer.output_dir={tmp_path / 'run'}"])
    batch, loss = _batch_and_loss(cfg, tiny_model_dir)
    shared = Path(tempfile.mkdtemp(prefix="prorl-attack-"))  # tmp_path's parents are closed to other uids
    shared.chmod(0o755)  # the attacker reads the ports from here, and can write nothing
    ports_file, stop_file = shared / "ports.json", shared / "stop"
    script = shared / "attacker.py"
    script.write_text(ATTACKER)
    script.chmod(0o644)
    out_path, err_path = tmp_path / "attacker.out", tmp_path / "attacker.err"  # files: no pipe to fill up
    with open(out_path, "w") as out, open(err_path, "w") as err:
        attacker = subprocess.Popen([SETPRIV, "--reuid", str(STRANGER), "--regid", str(STRANGER), "--clear-groups",
                                     sys.executable, str(script), str(ports_file), str(stop_file)],
                                    stdout=out, stderr=err, cwd="/",
                                    env={"PATH": os.environ.get("PATH", ""), "HOME": "/nonexistent"})
    seen: set[int] = set()
    stop_watch = threading.Event()

    def watch() -> None:  # the ports of the ranks as they open them, during the group's start too
        while not stop_watch.is_set():
            ports = _listening_ports(_ours(("MegatronRank", "RendezvousKV")))
            if ports - seen:
                seen.update(ports)
                tmp = ports_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(sorted(seen)))
                tmp.chmod(0o644)
                os.replace(tmp, ports_file)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    policy = None
    try:
        policy = POLICY_BACKENDS.get("megatron")(cfg, tiny_model_dir)  # the group starts under attack
        started = time.time()
        lp = policy.logprobs(batch, temperature=1.0)
        metrics = policy.train_minibatch(batch, loss, temperature=1.0)
        time.sleep(1.0)  # the watcher's last look: every port the ranks hold now
        stop_watch.set()
        watcher.join()
        final = _listening_ports(_ours(("MegatronRank",)))
        assert final <= seen and final, f"the ranks listen on {final}, the watcher saw {seen}"
        # the attacker has tried every port it was given before it stops
        stop_file.touch()
        attacker.wait(timeout=600)
        out, err = out_path.read_text(), err_path.read_text()
        reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert reports and reports[-1] == {"stopped": True, "uid": STRANGER}, err[-2000:]
        tried = {r["port"] for r in reports if "port" in r}
        assert tried == seen, f"the attacker tried {sorted(tried)} of {sorted(seen)}:\n{err[-2000:]}"
        assert min(r["at"] for r in reports if "port" in r) < started  # it was at the ranks' ports during the start
        served = [r for r in reports if r.get("keys") or r.get("wrote")
                  or any(not v.startswith("error") for v in r.get("read", {}).values())]
        assert not served, f"a port of the ranks served the attacker a store's keys: {served}"
        leaked = _rank0_store_has_attacker_keys(policy)
        assert not leaked, f"rank 0 reads keys the attacker wrote: {leaked}"
        # and the group started and trained regardless
        assert lp.shape == batch["old_logprobs"].shape and metrics["grad_norm"] > 0
    finally:
        stop_watch.set()
        stop_file.touch()
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
        if policy is not None:
            policy.close()
        shutil.rmtree(shared, ignore_errors=True)


def test_the_ray_store_keeps_torchs_store_semantics(tiny_model_dir):
    """What gloo's and NCCL's rendezvous and the store barrier rely on, through torch's own C++ wrapper (a
    PrefixStore, as every process group puts around its store), on a real rendezvous actor."""
    import datetime
    import gc

    import torch.distributed as dist

    from nemo_prorl import cluster
    from nemo_prorl.cluster.rendezvous import RayStore, RendezvousTimeout, start_rendezvous, stop_rendezvous

    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", "policy=megatron"])
    cluster.session(cfg, cluster.plan_from_config(cfg, backend="megatron"))
    kv = start_rendezvous()
    try:
        store = dist.PrefixStore("g", RayStore(kv, datetime.timedelta(seconds=60)))
        gc.collect()  # torch holds only the C++ half of the Python store: its methods must outlive our reference
        store.set("a", "1")
        store.set("b", b"\x00\xff")
        assert store.get("a") == b"1" and store.get("b") == b"\x00\xff"
        assert store.add("n", 2) == 2 and store.add("n", 3) == 5 and store.get("n") == b"5"
        assert store.compare_set("c", "", "x") == b"x"  # a missing key is set only against an empty expectation
        assert store.compare_set("d", "y", "z") == b"y" and not store.check(["d"])
        assert store.compare_set("c", "wrong", "w") == b"x" and store.compare_set("c", "x", "w") == b"w"
        assert store.check(["a", "b"]) and not store.check(["a", "missing"])
        assert store.num_keys() == 4  # a, b, n, c (PrefixStore counts the underlying store's keys)
        assert store.delete_key("a") and not store.delete_key("a")
        store.wait(["b", "n"])
        with pytest.raises(RendezvousTimeout, match=r"no key\(s\) \['g/missing'\] after 0.5s"):
            store.wait(["missing"], datetime.timedelta(seconds=0.5))
        assert isinstance(RendezvousTimeout("x"), dist.DistStoreError)
    finally:
        stop_rendezvous(kv)
