"""Running untrusted, model-generated programs. One interface, `Sandbox.run(code, inputs) -> SandboxRun`,
two backends in `SANDBOXES` (backends.py, which also builds one from the config): "local" (this module:
this machine; the containment is described in runner.py) and "remote" (an HTTP sandbox server for
clusters, see remote.py).

A run executes one program once per input (stdin) inside one sandbox, with a wall-time budget per test
and in total (ProRL §3.1 scores code 0 after 5 s in total). The trainer side enforces the total again
from outside, killing the runner's whole process group, so nothing it started can outlive the budget.
"""

from __future__ import annotations

import fcntl
import grp
import itertools
import json
import logging
import os
import pwd
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from nemo_prorl.config.schema import SandboxConfig
from nemo_prorl.confine import jail

log = logging.getLogger(__name__)
RUNNER = Path(__file__).with_name("runner.py")
DRIVER = Path(__file__).with_name("driver.py")
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


def check_root_only(folder: str, *, what: str) -> None:
    """Raise (naming the folder) unless only root can create or replace entries in `folder`: it and every
    folder above it are real folders (no symlinks) owned by root, and none is writable by others (a
    folder above may be sticky, like /tmp: a root-owned entry in it cannot be renamed by others)."""
    path = os.path.abspath(folder)
    parts = [path] + [str(p) for p in Path(path).parents]
    for i, p in enumerate(parts):
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            raise RuntimeError(f"{what}: {p} is a symlink; use a path without symlinks")
        open_to_others = st.st_mode & 0o022 and not (i > 0 and st.st_mode & stat.S_ISVTX)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or open_to_others:
            why = "writable by others" if open_to_others else "not a folder owned by root"
            raise RuntimeError(f"{what}: {p} (owner uid {st.st_uid}, mode {oct(stat.S_IMODE(st.st_mode))}) is "
                               f"{why}: another user could create or replace the lock folder there; use a "
                               "folder only root can write")


def _root_only(folder: str) -> bool:
    try:
        check_root_only(folder, what=folder)
        return True
    except (OSError, RuntimeError):
        return False


class UidBlock:
    """Sandbox uids for a trainer process that runs as root (issue 18): a block of `size` uids claimed
    with an exclusive lock held for the life of the process, so that two trainers on one node never run
    programs under the same uid (RLIMIT_NPROC counts per uid), and within the process each concurrent
    program gets a uid of its own. A uid is handed out only while no process runs under it (issue 29):
    `give` kills whatever a program left under its uid, and a uid that cannot be cleared is held back.
    A block is claimed only if it is nobody else's (issue 29 review): none of its ids is in a range of
    /etc/subuid or /etc/subgid (other users' rootless containers) or has a passwd or group entry, and no
    process runs in it (a crashed trainer's leftovers, or ids in use we cannot see otherwise: left alone,
    the next block is taken). So the kills after each program only ever reach our own programs."""

    BASE, SIZE, BLOCKS = 200000, 64, 12000
    # Where only root may create entries (issue 29: in /run/lock, mode 1777, another user could create this
    # folder first and turn every code and math row into an error): /run, else /var/lib.
    LOCK_DIR = os.path.join(next((d for d in ("/run", "/var/lib") if _root_only(d)), "/run"), "prorl-sandbox-uids")

    def __init__(self, lock_dir: Optional[str] = None, *, base: int = BASE, subuid: str = "/etc/subuid",
                 subgid: str = "/etc/subgid") -> None:
        """`lock_dir`: the lock folder (tests); by default LOCK_DIR. `base`: the first uid of block 0.
        `subuid`, `subgid`: the subordinate id files whose ranges belong to other users (tests)."""
        self.lock_dir = lock_dir
        self.base, self.subuid, self.subgid = base, subuid, subgid
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._dirty: set[int] = set()  # given back with processes that could not be killed yet
        self._held: list[Any] = []  # open lock files: closing one releases its block
        self._range = range(0)  # the block held (kill_uid_processes refuses any uid outside it)
        self._pid = os.getpid()

    @property
    def path(self) -> str:
        return self.lock_dir or self.LOCK_DIR

    def _claim(self) -> None:
        path = self.path
        check_root_only(os.path.dirname(path) or "/", what=f"the sandbox uid lock folder {path}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else f"mode {oct(stat.S_IMODE(st.st_mode))}"
            raise RuntimeError(f"{path} is not a private folder of uid {os.getuid()} (owned by uid {st.st_uid}, "
                               f"{kind}): refusing to take sandbox uids from it; remove it")
        start = os.getpid() % self.BLOCKS
        for k in itertools.chain(range(start, self.BLOCKS), range(start)):
            block = range(self.base + k * self.SIZE, self.base + (k + 1) * self.SIZE)
            if self.foreign(block):  # another user's ids (a rootless container's): never ours to kill
                continue
            f = os.fdopen(os.open(os.path.join(path, f"{k}.lock"),
                                  os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600), "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            live = _processes_of(set(block))
            if live:  # a crashed trainer's programs, or ids in use we do not know of: leave them alone
                log.warning("sandbox uid block %d-%d has %d live processes (e.g. pid %d); skipped", block.start,
                            block.stop - 1, len(live), next(iter(live)))
                f.close()
                continue
            self._held.append(f)
            self._range = block
            self._free += list(block)
            return
        raise RuntimeError(f"no free sandbox uid block in {path}")

    def foreign(self, block: range) -> bool:
        """Whether any id of `block` belongs to someone: a range of `subuid` or `subgid` (other users'
        rootless containers), or a passwd or group entry (programs run with gid == uid). Unreadable files
        and malformed lines count as no range."""
        for path in (self.subuid, self.subgid):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines:
                parts = line.strip().split(":")
                if len(parts) != 3 or line.lstrip().startswith("#"):
                    continue
                try:
                    lo, n = int(parts[1]), int(parts[2])
                except ValueError:
                    continue
                if lo < block.stop and block.start < lo + n:
                    return True
        for i in block:
            try:
                pwd.getpwuid(i)
                return True
            except (KeyError, OverflowError):
                pass
            try:
                grp.getgrgid(i)
                return True
            except (KeyError, OverflowError):
                pass
        return False

    def _fork_check(self) -> None:
        if self._pid != os.getpid():  # a forked child shares the parent's locks: claim its own block
            self._free, self._held, self._dirty, self._pid = [], [], set(), os.getpid()
            self._range = range(0)

    def reserve(self) -> None:
        """Claim this process's block now: a launch-time check (an unusable lock folder fails the run at
        its start, with the path, instead of every code and math row later)."""
        with self._lock:
            self._fork_check()
            if not self._held:
                self._claim()

    def take(self) -> int:
        """A uid no process runs under: the free list holds only uids that a full scan found empty (when
        the block was claimed, or given back), and nothing but this process starts processes under them."""
        with self._lock:
            self._fork_check()
            if not self._free and self._dirty:  # held back earlier: usable once their processes are gone
                still = kill_uid_processes(self._dirty, within=self._range, rounds=3)
                self._free += sorted(self._dirty - still)
                self._dirty = still
            if not self._free:
                self._claim()
            return self._free.pop(0)

    def give(self, uid: int) -> None:
        """Back to the free list once no process runs under `uid` (killed here: a program's daemons,
        double-forked out of its process group, would otherwise meet the next program under this uid)."""
        with self._lock:
            within = self._range
        if uid not in within:  # not from this block (a forked child's, or a bug): never killed by us
            log.error("sandbox uid %d given back is not in this process's block %s; not reused", uid, within)
            return
        left = kill_uid_processes({uid}, within=within)
        with self._lock:
            if self._pid == os.getpid():
                if left:
                    log.error("sandbox uid %d still has processes after SIGKILL; not reused", uid)
                    self._dirty.add(uid)
                else:
                    self._free.append(uid)


def kill_uid_processes(uids: set[int], *, within: range, rounds: int = 100) -> set[int]:
    """SIGKILL every process running under one of `uids` until a scan of /proc finds none; `within`: the
    sandbox block they must lie in (root and any uid outside it are refused: kill(-1) as root would kill
    everything). Returns the uids that still had processes after `rounds` scans (stuck in the kernel).

    Each kill is kill(-1, SIGKILL) from a child that became the uid (issue 29 review): the kernel signals
    every process of the uid in one pass, catches a process whose main thread exited while others run
    (State Z, Threads > 1), and cannot hit a recycled pid of another uid, as os.kill after a scan could."""
    bad = sorted(u for u in uids if u == 0 or u not in within or 0 in within)
    if bad:
        raise ValueError(f"refusing to kill the processes of uid {bad[0]}: outside the sandbox block {within} "
                         "(kill(-1) as uid 0 would kill every process)")
    left: dict[int, int] = {}
    for i in range(rounds):
        left = _processes_of(uids)
        if not left:
            return set()
        for uid in set(left.values()):
            jail.kill_uid(uid, within)
        time.sleep(min(0.001 * 2 ** i, 0.05))  # the killed exit asynchronously
    return set(left.values())


def _processes_of(uids: set[int]) -> dict[int, int]:
    """{pid: uid} of the live processes running under one of `uids`. /proc/PID/status, not the owner of
    /proc/PID, which is root for a process that made itself non-dumpable."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                text = f.read(4096)
        except OSError:
            continue
        fields = dict(line.split(b":", 1) for line in text.splitlines() if b":" in line)
        state = fields.get(b"State", b"Z").strip()[:1]
        # a zombie leader whose other threads still run (its main thread called SYS_exit) is live
        if state == b"X" or (state == b"Z" and int(fields.get(b"Threads", b"1").strip() or 1) <= 1):
            continue
        hit = [u for u in map(int, fields.get(b"Uid", b"").split()) if u in uids]
        if hit:
            out[int(name)] = hit[0]
    return out


UIDS = UidBlock()  # one per process: every LocalSandbox of a trainer shares its block


def check_sandbox_uids() -> None:
    """At a run's start, when this process is root: claim its block of sandbox uids now, so that an unusable
    lock folder (planted by another user) fails the run there with its path, instead of scoring every code
    and math row as an error."""
    if os.getuid() == 0:
        UIDS.reserve()


def _driver_source() -> str:
    return DRIVER.read_text(encoding="utf-8")


class LocalSandbox:
    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        self.python = os.path.realpath(cfg.python or sys._base_executable)  # type: ignore[attr-defined]
        check_sandbox_uids()  # built at launch: an unusable uid lock folder fails the run here
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
        harness (driver.py), which loads the program and writes its result to `TestRun.result`."""
        t0 = time.monotonic()
        uid = None
        try:
            uid = UIDS.take() if os.getuid() == 0 else None
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
