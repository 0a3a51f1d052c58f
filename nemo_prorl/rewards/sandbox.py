"""Running untrusted, model-generated programs. One interface, `Sandbox.run(code, inputs) -> SandboxRun`,
two backends in `SANDBOXES`: "local" (this machine; the containment is described in sandbox_runner.py)
and "remote" (an HTTP sandbox server for clusters, see sandbox_remote.py).

A run executes one program once per input (stdin) inside one sandbox, with a wall-time budget per test
and in total (ProRL §3.1 scores code 0 after 5 s in total). The trainer side enforces the total again
from outside, killing the runner's whole process group, so nothing it started can outlive the budget.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from nemo_prorl.config.schema import SandboxConfig
from nemo_prorl.registry import Registry
from nemo_prorl.rewards import jail

log = logging.getLogger(__name__)
RUNNER = Path(__file__).with_name("sandbox_runner.py")
DRIVER = Path(__file__).with_name("sandbox_driver.py")
# Statuses of one test execution. "ok" only means exit code 0; the caller compares the output.
TEST_STATUSES = ("ok", "runtime_error", "timeout", "killed", "output_limit", "file_size_limit")


@dataclass
class TestRun:
    status: str
    returncode: Optional[int] = None
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    result: str = ""  # what the function-test harness wrote (its fd 3)


@dataclass
class SandboxRun:
    tests: list[TestRun] = field(default_factory=list)
    error: str = ""  # the sandbox itself failed (not the program): set up, runner crash, transport
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "SandboxRun":
        return SandboxRun(tests=[TestRun(**t) for t in d.get("tests", [])], error=d.get("error", ""),
                          wall_s=d.get("wall_s", 0.0), notes=list(d.get("notes", [])))


class Sandbox(Protocol):
    def run(self, code: str, inputs: Sequence[str], driver: bool = False) -> SandboxRun: ...


SANDBOXES: Registry[Callable[[SandboxConfig], Sandbox]] = Registry("sandbox backend")


def _namespaces_available() -> bool:
    """Probe once whether this kernel lets us create the namespaces (containers often forbid them)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        r = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "true"]
                           if os.getuid() else ["unshare", "--net", "--mount", "--pid", "--fork", "true"],
                           capture_output=True, timeout=10)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class UnconfinedError(RuntimeError):
    """This machine cannot confine generated programs and the config does not allow running them anyway."""


_warned_unconfined = False


class UidBlock:
    """Sandbox uids for a trainer process that runs as root (issue 18): a block of `size` uids claimed
    with an exclusive lock held for the life of the process, so that two trainers on one node never run
    programs under the same uid (RLIMIT_NPROC counts per uid), and within the process each concurrent
    program gets a uid of its own."""

    BASE, SIZE, BLOCKS = 200000, 64, 12000
    LOCK_DIR = "/run/lock/prorl-sandbox-uids" if os.path.isdir("/run/lock") else "/tmp/prorl-sandbox-uids"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._held: list[Any] = []  # open lock files: closing one releases its block
        self._pid = os.getpid()

    def _claim(self) -> None:
        os.makedirs(self.LOCK_DIR, mode=0o700, exist_ok=True)
        st = os.lstat(self.LOCK_DIR)  # /run/lock is world-writable: another user could have planted it
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise RuntimeError(f"{self.LOCK_DIR} is not a private folder of uid {os.getuid()} (a symlink, "
                               "another owner or open permissions); remove it")
        start = os.getpid() % self.BLOCKS
        for k in itertools.chain(range(start, self.BLOCKS), range(start)):
            f = os.fdopen(os.open(os.path.join(self.LOCK_DIR, f"{k}.lock"),
                                  os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600), "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            self._held.append(f)
            self._free += range(self.BASE + k * self.SIZE, self.BASE + (k + 1) * self.SIZE)
            return
        raise RuntimeError(f"no free sandbox uid block in {self.LOCK_DIR}")

    def take(self) -> int:
        with self._lock:
            if self._pid != os.getpid():  # a forked child shares the parent's locks: claim its own block
                self._free, self._held, self._pid = [], [], os.getpid()
            if not self._free:
                self._claim()
            return self._free.pop(0)

    def give(self, uid: int) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._free.append(uid)


UIDS = UidBlock()  # one per process: every LocalSandbox of a trainer shares its block


def _driver_source() -> str:
    return DRIVER.read_text(encoding="utf-8")


class LocalSandbox:
    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        self.python = os.path.realpath(cfg.python or sys._base_executable)  # type: ignore[attr-defined]
        self.namespaces = _namespaces_available()
        if not self.namespaces:
            if not cfg.allow_unconfined:
                raise UnconfinedError(
                    "the code sandbox cannot confine programs on this machine (user, mount and PID namespaces "
                    "are refused; e.g. Docker's default seccomp profile). Run where namespaces are allowed, use "
                    "reward.sandbox.backend=remote, or accept the risk with reward.sandbox.allow_unconfined=true")
            if os.getuid() == 0 and not jail.world_executable(self.python):
                raise UnconfinedError(
                    f"the unconfined sandbox would run programs as root: {self.python} is not reachable by an "
                    "unprivileged uid (a folder on its path is closed to others). Set reward.sandbox.python to an "
                    "interpreter every user can run (e.g. /usr/bin/python3)")
            _warn_unconfined()
        self.ro_paths = jail.allowlist_paths(self.python)
        self.runner_prefix: list[str] = []  # tests run the runner under another identity (setpriv)
        self.uids_used: set[int] = set()  # the uids this sandbox ran programs under (when root)

    def _nproc(self) -> int:
        if os.getuid() == 0:  # the runner drops to a uid of its own; only the sandbox's processes count
            return self.cfg.max_processes
        # RLIMIT_NPROC counts all of this user's processes, the trainer's included; the runner's own
        # budget (processes in its PID namespace) is the tree-wide limit here
        mine = sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _owner(p) == os.getuid())
        return mine + self.cfg.max_processes

    def run(self, code: str, inputs: Sequence[str], driver: bool = False) -> SandboxRun:
        """Run `code` once per input. With `driver`, each input is a request for the function-test
        harness (sandbox_driver.py), which loads the program and writes its result to `TestRun.result`."""
        t0 = time.monotonic()
        uid = UIDS.take() if os.getuid() == 0 else None
        try:
            res = self._run(code, inputs, driver, uid)
        except Exception as e:  # noqa: BLE001  a sandbox failure is recorded for this program, not raised
            res = SandboxRun(error=f"{type(e).__name__}: {e}")
        finally:
            if uid is not None:
                UIDS.give(uid)
        res.wall_s = time.monotonic() - t0
        return res

    def _spec(self, code: str, inputs: Sequence[str], driver: bool, uid: Optional[int]) -> dict[str, Any]:
        cfg = self.cfg
        files = {"solution.py": code}
        if driver:
            files["driver.py"] = _driver_source()
        entry = "driver.py" if driver else "solution.py"
        return {
            "python": self.python, "files": files, "confined": self.namespaces, "ro_paths": self.ro_paths,
            "tests": [{"stdin": text, "entry": entry} for text in inputs], "uid": uid,
            "disk_mb": cfg.disk_mb, "total_timeout_s": cfg.total_timeout_s,
            "per_test_timeout_s": cfg.per_test_timeout_s,
            "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/w", "TMPDIR": "/w",
                    "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"},
            "limits": {"cpu_time_s": cfg.cpu_time_s, "memory_mb": cfg.memory_mb, "nproc": self._nproc(),
                       "max_processes": cfg.max_processes, "max_file_bytes": cfg.max_file_bytes,
                       "max_output_bytes": cfg.max_output_bytes, "max_run_output_bytes": cfg.max_run_output_bytes},
        }

    def _run(self, code: str, inputs: Sequence[str], driver: bool, uid: Optional[int]) -> SandboxRun:
        if uid is not None:
            self.uids_used.add(uid)
        spec = self._spec(code, inputs, driver, uid)
        # The spec travels on stdin: nothing of the program is written to the host's file system.
        proc = subprocess.Popen(
            [*self.runner_prefix, self.python, "-I", "-B", str(RUNNER)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env=dict(spec["env"], HOME="/"),
            start_new_session=True, close_fds=True)
        try:
            # The runner enforces the budget itself; this outer limit only catches a runner that hangs.
            out, err = proc.communicate(json.dumps(spec).encode(), timeout=self.cfg.total_timeout_s + 10.0)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            proc.communicate()
            return SandboxRun(error="sandbox runner did not finish; killed")
        finally:
            _killpg(proc.pid)
        line = out.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        try:
            payload = json.loads(line[0])
        except json.JSONDecodeError:
            return SandboxRun(error=f"sandbox runner exited {proc.returncode}: {err.decode(errors='replace')[-500:]}")
        if "error" in payload:
            return SandboxRun(error=payload["error"])
        tests = [TestRun(**{k: t.get(k, "") for k in ("status", "returncode", "stdout", "stderr", "wall_s", "result")})
                 for t in payload["results"]]
        return SandboxRun(tests=tests, notes=payload.get("notes", []))


def _warn_unconfined() -> None:
    global _warned_unconfined
    if not _warned_unconfined:
        _warned_unconfined = True
        log.warning("reward.sandbox.allow_unconfined=true and this machine cannot create namespaces: generated "
                    "programs run with rlimits only and can read this machine's files")


def sandbox_confines() -> bool:
    """Whether the local sandbox can confine programs on this machine (the trainer records an event when a
    run goes on without, under reward.sandbox.allow_unconfined)."""
    return _namespaces_available()


def _owner(p: Path) -> int:
    try:
        return p.stat().st_uid
    except OSError:
        return -1


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


SANDBOXES.register("local")(LocalSandbox)


def make_sandbox(cfg: SandboxConfig) -> Sandbox:
    from nemo_prorl.rewards import sandbox_remote  # noqa: F401  (registers "remote")

    return SANDBOXES.get(cfg.backend, "reward.sandbox.backend")(cfg)
