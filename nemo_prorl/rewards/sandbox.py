"""Running untrusted, model-generated programs. One interface, `Sandbox.run(code, inputs) -> SandboxRun`,
two backends in `SANDBOXES`: "local" (this machine; the containment is described in sandbox_runner.py)
and "remote" (an HTTP sandbox server for clusters, see sandbox_remote.py).

A run executes one program once per input (stdin) inside one sandbox, with a wall-time budget per test
and in total (ProRL §3.1 scores code 0 after 5 s in total). The trainer side enforces the total again
from outside, killing the runner's whole process group, so nothing it started can outlive the budget.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from nemo_prorl.config.schema import SandboxConfig
from nemo_prorl.registry import Registry

RUNNER = Path(__file__).with_name("sandbox_runner.py")
# Statuses of one test execution. "ok" only means exit code 0; the caller compares the output.
TEST_STATUSES = ("ok", "runtime_error", "timeout", "killed", "output_limit", "file_size_limit")


@dataclass
class TestRun:
    status: str
    returncode: Optional[int] = None
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0


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
    def run(self, code: str, inputs: Sequence[str]) -> SandboxRun: ...


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


def _hidden_dirs(extra: Sequence[str]) -> list[str]:
    """Directories the program must not see or write: the trainer's home, working directory, project and
    environment, and the world-writable temp dirs (the run's own work dir is bound back inside).
    Nested entries are merged; never `/`."""
    pkg_root = Path(__file__).resolve().parents[2]
    # Ray's token and session folder (its sockets): a program that reached them could join the cluster
    ray = [os.path.dirname(os.environ.get("RAY_AUTH_TOKEN_PATH", "")), os.environ.get("RAY_TMPDIR", "")]
    cands = {os.path.expanduser("~"), os.getcwd(), str(pkg_root), sys.prefix, tempfile.gettempdir(),
             "/tmp", "/var/tmp", "/dev/shm", *ray, *extra}
    out: list[str] = []
    for c in sorted({os.path.realpath(c) for c in cands if c and os.path.isdir(c)}):
        if c != "/" and not any(c.startswith(o + "/") for o in out):
            out.append(c)
    return out


class LocalSandbox:
    # Programs started as root run under uids 200000-299999, one per program. Each trainer process starts
    # at its own offset, so two runs on one machine rarely share a uid (and so an RLIMIT_NPROC count).
    _uids = itertools.count(os.getpid() * 7919 % 100000)

    def __init__(self, cfg: SandboxConfig, hide: Sequence[str] = ()) -> None:
        self.cfg = cfg
        self.python = cfg.python or os.path.realpath(sys._base_executable)  # type: ignore[attr-defined]
        self.namespaces = _namespaces_available()
        self.hide = _hidden_dirs(hide)
        base = os.path.realpath(sys.base_prefix)
        self.keep = sorted({base, os.path.dirname(self.python)})
        self._lock = threading.Lock()
        self.uids_used: set[int] = set()  # the uids this sandbox ran programs under (when root)

    def _nproc(self) -> int:
        if os.getuid() == 0:  # the runner drops to a uid of its own; only the sandbox's processes count
            return self.cfg.max_processes
        # RLIMIT_NPROC counts all of this user's processes, the trainer's included
        mine = sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _owner(p) == os.getuid())
        return mine + self.cfg.max_processes

    def run(self, code: str, inputs: Sequence[str]) -> SandboxRun:
        t0 = time.monotonic()
        workdir = os.path.realpath(tempfile.mkdtemp(prefix="prorl-sbx-"))
        try:
            res = self._run_in(workdir, code, inputs)
        except Exception as e:  # noqa: BLE001  a sandbox failure is recorded for this program, not raised
            res = SandboxRun(error=f"{type(e).__name__}: {e}")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        res.wall_s = time.monotonic() - t0
        return res

    def _run_in(self, workdir: str, code: str, inputs: Sequence[str]) -> SandboxRun:
        cfg = self.cfg
        Path(workdir, "solution.py").write_text(code, encoding="utf-8")
        for i, text in enumerate(inputs):
            Path(workdir, f".in{i}").write_text(text, encoding="utf-8")
        with self._lock:
            uid = 200000 + next(self._uids) % 100000
            self.uids_used.add(uid)
        spec = {
            "workdir": workdir, "program": os.path.join(workdir, "solution.py"), "python": self.python,
            "num_tests": len(inputs), "namespaces": self.namespaces, "hide": self.hide,
            "keep": self.keep, "uid": uid,
            "total_timeout_s": cfg.total_timeout_s, "per_test_timeout_s": cfg.per_test_timeout_s,
            "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
                    "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"},
            "limits": {"cpu_time_s": cfg.cpu_time_s, "memory_mb": cfg.memory_mb, "nproc": self._nproc(),
                       "max_file_bytes": cfg.max_file_bytes, "max_output_bytes": cfg.max_output_bytes},
        }
        spec_path = os.path.join(workdir, ".spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        proc = subprocess.Popen(
            [self.python, "-I", "-B", str(RUNNER), spec_path], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=spec["env"],
            start_new_session=True, close_fds=True)
        try:
            # The runner enforces the budget itself; this outer limit only catches a runner that hangs.
            out, err = proc.communicate(timeout=cfg.total_timeout_s + 10.0)
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
        tests = [TestRun(**{k: t[k] for k in ("status", "returncode", "stdout", "stderr", "wall_s")})
                 for t in payload["results"]]
        return SandboxRun(tests=tests, notes=payload.get("notes", []))


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
