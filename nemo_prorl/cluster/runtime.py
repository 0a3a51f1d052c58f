"""Ray, the runtime of everything beyond the controller's process: start a private cluster on this machine
or attach to the one a launcher started, always with token authentication.

A private cluster (no `cluster.ray_address`):
- binds loopback only: Ray's node address is 127.0.0.1 (its `ENABLE_RAY_CLUSTER` switch off, which makes
  the node address loopback instead of the machine's interface), so nothing is reachable from elsewhere;
- keeps its session files in a private temp folder (0700, RAY_TMPDIR), with a fresh token in it (mode
  0600; RAY_AUTH_MODE=token): a client without the token cannot join, a stray connection cannot submit work;
- has a bounded object store, no dashboard unless `cluster.ray_dashboard`, and no usage reporting;
- is shut down with the run.
Attaching (`cluster.ray_address`, set by the launchers): the token comes from `cluster.ray_token_file` or
$RAY_AUTH_TOKEN_PATH; a cluster without token authentication is refused.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("nemo_prorl")

# The custom resource a CPU slot is counted in (a GPU is Ray's own "GPU"): a private CPU cluster, a
# simulated node or a CPU launcher's `ray start --resources` declares how many a node has.
CPU_SLOT = "prorl_slot"


class RayStartError(RuntimeError):
    pass


def write_token(path: Path) -> Path:
    """A fresh random token at `path`, readable by its owner only (0600 from creation, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def loopback_only() -> None:
    """Make Ray's node address 127.0.0.1 on this machine (see the module docstring); for private clusters
    and tests. The environment variable reaches Ray's own processes, the attribute this one."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def auth_env(token_file: Path) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_USAGE_STATS_ENABLED": "0"}


# Ray starts its workers at niceness 15: next to any other busy process, our ranks and engines (which are
# the job, not background work) would get a sliver of the CPU (measured: 4% each beside two CPU hogs).
NORMAL_PRIORITY = {"RAY_worker_niceness": "0"}


@dataclass
class RayRuntime:
    """The Ray cluster of this run; `close()` stops it if this run started it."""

    address: str
    token_file: Path
    private: bool
    temp_dir: Optional[Path] = None
    started_s: float = 0.0
    connected_here: bool = True  # this run connected (ray.init); False: it joined the process's connection

    def close(self) -> None:
        import ray

        if self.connected_here and ray.is_initialized():
            ray.shutdown()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def _token_for_this_process() -> Path:
    """The token this process's Ray uses. Ray reads RAY_AUTH_MODE when it is first imported and keeps one
    token per process, so: a fresh one (0600, in a private folder removed at exit) if Ray is not imported
    yet, else the one already configured (a test session's, set up before anything imported Ray)."""
    if "ray" not in sys.modules:
        os.environ.pop("RAY_AUTH_TOKEN", None)  # Ray would prefer it to the file: no token of unknown origin
        folder = Path(tempfile.mkdtemp(prefix="prorl-ray-token-"))
        atexit.register(shutil.rmtree, folder, True)
        token = write_token(folder / "token")
        os.environ.update(auth_env(token))
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_TOKEN"):
        raise RayStartError("RAY_AUTH_TOKEN is set: Ray would use it instead of the token file; unset it")
    if os.environ.get("RAY_AUTH_MODE") != "token" or not path or not Path(path).is_file():
        raise RayStartError("Ray was imported before token authentication was set up: set RAY_AUTH_MODE=token "
                            "and RAY_AUTH_TOKEN_PATH (a file of mode 0600) before importing ray")
    if Path(path).stat().st_mode & 0o077:
        raise RayStartError(f"the Ray token file {path} is readable by others: chmod 600 it")
    return Path(path)


def start_private(*, resources: dict[str, float], object_store_gb: float, dashboard: bool = False,
                  num_cpus: Optional[int] = None, num_gpus: Optional[int] = None) -> RayRuntime:
    """A Ray cluster of this machine alone, for this run: loopback, token, own temp folder (see above)."""
    # A private folder (0700) with a short path: Ray's Unix sockets live below it (108-byte limit).
    token = _token_for_this_process()
    temp = Path(tempfile.mkdtemp(prefix="prorl-ray-"))
    os.environ["RAY_TMPDIR"] = str(temp)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.update(NORMAL_PRIORITY)  # read by the raylet this starts
    import ray

    if ray.is_initialized():
        shutil.rmtree(temp, ignore_errors=True)
        raise RayStartError("Ray is already initialised in this process; one run, one cluster")
    loopback_only()
    t0 = time.monotonic()
    try:
        ctx = ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                       object_store_memory=int(object_store_gb * 2**30), resources=resources, num_cpus=num_cpus,
                       num_gpus=num_gpus, log_to_driver=True, logging_level=logging.WARNING,
                       configure_logging=False)
    except Exception:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    rt = RayRuntime(address=ctx.address_info["gcs_address"], token_file=token, private=True, temp_dir=temp,
                    started_s=time.monotonic() - t0)
    log.info("started a private Ray cluster at %s (%.1fs)", rt.address, rt.started_s)
    return rt


def _check_private(path: Path) -> None:
    st = path.stat()
    if st.st_mode & 0o077 or st.st_uid != os.getuid():
        raise RayStartError(f"the Ray token file {path} must be yours and readable by you alone (chmod 600)")


def require_token_auth(address: str, timeout_s: float = 60.0) -> None:
    """Refuse a cluster that answers a client without a token: one that does not authenticate would take
    work from anyone who reaches it, and what it returns is unpickled by Ray."""
    import subprocess

    probe = ("import sys\nfrom ray._raylet import GcsClient\ntry:\n    c = GcsClient(address=sys.argv[1])\n"
             "    c.internal_kv_keys(b'', namespace=None, timeout=5)\n    print('OPEN')\n"
             "except Exception as e:\n    print('REFUSED', type(e).__name__)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = subprocess.run([sys.executable, "-c", probe, address], env={**env, "RAY_AUTH_MODE": "disabled"},
                         capture_output=True, text=True, timeout=timeout_s)
    if "REFUSED AuthenticationError" in out.stdout:
        return
    if "OPEN" not in out.stdout:  # nothing answered (yet): the caller may retry
        raise ConnectionError(f"no Ray cluster answers at {address}: {out.stdout.strip() or out.stderr.strip()[-300:]}")
    raise RayStartError(f"the Ray cluster at cluster.ray_address={address!r} does not require its token (a client "
                        "without one was served): start it with RAY_AUTH_MODE=token (the launchers do)")


def attach(address: str, token_file: Optional[str], timeout_s: float = 120.0) -> RayRuntime:
    """Join the Ray cluster a launcher started (retrying while its head comes up, up to `timeout_s`); its
    token file must be given (or in $RAY_AUTH_TOKEN_PATH), private to this user, and the cluster must
    refuse clients without it."""
    path = token_file or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if "ray" not in sys.modules and path:  # Ray reads its auth settings when first imported
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ.update(auth_env(Path(path)))
    import ray

    if ray.is_initialized():  # this process joined already (a test driving a simulated cluster)
        current = ray.get_runtime_context().gcs_address
        if current != address:
            raise RayStartError(f"this process is on the Ray cluster at {current}, not cluster.ray_address={address!r}")
        return RayRuntime(address=address, token_file=Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "")), private=False,
                          connected_here=False)
    if not path or not Path(path).is_file():
        raise RayStartError(f"cluster.ray_address={address!r} needs the cluster's token: cluster.ray_token_file or "
                            f"$RAY_AUTH_TOKEN_PATH (got {path!r})")
    _check_private(Path(path))
    os.environ.update(auth_env(Path(path)))
    t0 = time.monotonic()
    while True:
        try:
            require_token_auth(address)
            ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING, configure_logging=False)
            break
        except Exception as e:  # noqa: BLE001  Ray's own errors: wrong token, nothing listening (yet), version skew
            if isinstance(e, RayStartError) or time.monotonic() - t0 > timeout_s:
                raise RayStartError(f"cannot attach to the Ray cluster at cluster.ray_address={address!r} with the "
                                    f"token in {path} within {timeout_s:g}s: {type(e).__name__}: {e}") from None
            time.sleep(2.0)
    return RayRuntime(address=address, token_file=Path(path), private=False, started_s=time.monotonic() - t0)


def wait_for_nodes(num_nodes: int, timeout_s: float, *, resource: str = "GPU", per_node: float = 0.0) -> list[dict]:
    """Block until `num_nodes` live nodes (each with `per_node` of `resource`, if given) have joined the
    attached cluster; a named error after `timeout_s` lists the nodes that did."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get(resource, 0.0) >= per_node]
        if len(nodes) >= num_nodes:
            # a node with room for two of the plan's nodes could get both placement groups: the plan's
            # "node 1" would share a machine with "node 0" while a real node idles
            big = [n for n in nodes if per_node and n["Resources"][resource] >= 2 * per_node]
            if big:
                raise RayStartError(f"node {big[0]['NodeManagerAddress']} has {big[0]['Resources'][resource]:g} "
                                    f"{resource}, at least twice the {per_node:g} per node of the plan: start Ray with "
                                    f"--num-gpus / --resources equal to cluster.gpus_per_node / cpu_slots_per_node")
            return nodes
        if time.monotonic() > deadline:
            have = ", ".join(f"{n['NodeManagerAddress']} ({n['Resources'].get(resource, 0):g} {resource})"
                             for n in ray.nodes() if n.get("Alive")) or "none"
            raise RayStartError(f"only {len(nodes)} of cluster.num_nodes={num_nodes} nodes with {per_node:g} "
                                f"{resource} joined the Ray cluster within {timeout_s:.0f}s; alive: {have}")
        time.sleep(1.0)
