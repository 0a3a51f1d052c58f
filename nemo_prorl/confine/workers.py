"""A pool of worker processes with a hard per-call time limit. Verifiers such as Math-Verify and sympy
are pure Python but can spin for minutes on a pathological expression (`2^{2^{2^{100}}}`), and big-integer
arithmetic in C never returns to the interpreter to see a signal. So a call that exceeds its limit gets its
worker killed and replaced; the call is reported as timed out and the pool keeps serving.

Workers are started with the "spawn" method (no copy of the trainer's threads, CUDA context or memory) and
serve up to RECYCLE_CALLS calls. `fn` must be importable by name (a module-level function) and return
plain data: a worker evaluates model answers, so it is confined (`confine`), and the trainer reads only
JSON from it, never a pickle.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import multiprocessing as mp
import os
import queue
import resource
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from nemo_prorl.confine import jail
from nemo_prorl.confine.guard import StateGuard
from nemo_prorl.procs import ignore_preemption_signals, track

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    # "ok", "error" (fn raised, or the worker died), "timeout", or "tampered" (the call changed the verifier's
    # globals: a hostile answer, scored 0 as wrong)
    status: str
    value: Any = None
    reason: str = ""


def confine(ro_paths: Sequence[str] = (), uid: Optional[int] = None) -> None:
    """Runs in each worker before its first call. Verifiers parse model output with sympy's parse_expr (an
    eval), and some reasoning-gym scorers eval it outright, so what runs here may be the model's code
    (issue 18). The worker gets no secrets (environment scrubbed), no network, and a root file system that
    holds only the interpreter, its packages, this package and `ro_paths`, read-only: no data, checkpoints,
    home or /proc (so no parent's /proc/PID/environ). It drops to an unprivileged uid, and `_serve` adds a
    seccomp filter (no new processes, exec or signals) before the first answer. What it sends back is
    JSON, and a call that changed the verifier's globals (`StateGuard`, guard.py) ends the worker."""
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "PYTHONHASHSEED") if k in os.environ}
    os.environ.clear()
    os.environ.update(keep, HOME="/tmp", TMPDIR="/tmp")
    for res, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_AS, 8 << 30)):
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            pass
    if not sys.platform.startswith("linux"):
        return
    # No terminal and none of the trainer's output files: an answer could otherwise push keystrokes into
    # the trainer's terminal (TIOCSTI) or truncate and rewrite its log.
    try:
        os.setsid()
    except OSError:
        pass
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    try:
        _jail(ro_paths, uid)
    except OSError as e:  # containers may forbid namespaces; the code sandbox refuses there, verifiers go on
        os.environ["PRORL_VERIFIER_UNCONFINED"] = str(e)
        try:
            jail.install_seccomp(jail.DENY_ALWAYS)
        except OSError:
            pass


def _import_roots() -> list[str]:
    """What the worker must still import from: the interpreter's and the environment's prefixes and this
    package (an editable install lives in the project folder, which must not be visible as a whole)."""
    pkg = Path(__file__).resolve().parents[1]
    roots = {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix), str(pkg)}
    return sorted(roots)


def _jail(ro_paths: Sequence[str], uid: Optional[int]) -> None:
    userns = jail.enter_namespaces(jail.CLONE_NEWNET | jail.CLONE_NEWIPC | jail.CLONE_NEWUTS | jail.CLONE_NEWPID)
    # Continue as PID 1 of a new PID namespace: the trainer's processes (and, on the same uid, their
    # /proc environ, signals and rlimits) are out of reach. The outer process only passes the exit on.
    # The outer holds the write end of `alive` while it lives: the inner sees EOF once the outer is gone.
    alive, outer_end = os.pipe()
    child = os.fork()
    if child:
        os.close(alive)
        _, status = os.waitpid(child, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    os.close(outer_end)
    jail.prctl(jail.PR_SET_PDEATHSIG, 9)  # killed with the outer process (the pool kills that one)
    # a folder of its own for the new root, so that binds below /tmp (a project cloned there) stay visible
    root = "/dev/shm" if os.path.isdir("/dev/shm") else "/mnt"
    paths = jail.allowlist_paths(sys.executable, tuple(_import_roots()) + tuple(os.path.realpath(p) for p in ro_paths))
    jail.build_root(root, paths, size_mb=64)
    scratch = "/.scratch"
    os.makedirs(root + scratch)
    jail.mount("proc", root + "/proc", "proc", jail.MS_NOSUID | jail.MS_NODEV | jail.MS_NOEXEC)
    jail.pivot(root)
    jail.remount_root_readonly()
    jail.mount("tmpfs", scratch, "tmpfs", jail.MS_NOSUID | jail.MS_NODEV, "size=64m,mode=1777")
    os.environ.update(HOME=scratch, TMPDIR=scratch)
    os.chdir(scratch)
    jail.become_unprivileged(uid, userns)
    _die_with_outer(alive)
    jail.prctl(jail.PR_SET_DUMPABLE, 0)
    jail.install_seccomp(jail.DENY_ALWAYS)


def _die_with_outer(alive: int) -> None:
    """The uid change cleared the death signal (the kernel clears it when the effective uid or the
    capabilities change, issue 29): set it again, then check that the outer process did not die before it
    was set (its end of the `alive` pipe closed), since the signal is sent only for a parent that dies
    afterwards. A second line: the pool kills the worker's tree itself (`_kill_tree`)."""
    jail.prctl(jail.PR_SET_PDEATHSIG, signal.SIGKILL)
    if _ready(alive, 0.0):  # EOF: no writer left
        os._exit(1)
    os.close(alive)


def _ready(fd: int, timeout: float) -> bool:
    """Whether `fd` polls readable within `timeout` seconds (poll, not select: a trainer's descriptors can
    be numbered past select's 1024)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(max(0, int(timeout * 1000))))


def _send(conn, msg: list) -> None:
    """Worker -> trainer messages are JSON: the trainer never unpickles what a process that evaluated a
    model's answer sends (that process could send a pickle that runs code in the trainer)."""
    try:
        data = json.dumps(msg)
    except (TypeError, ValueError) as e:
        data = json.dumps(["error", f"the result is not plain data: {e}"])
    conn.send_bytes(data.encode())


def _serve(conn, initializer: Optional[Callable[[], None]], preload: Sequence[str]) -> None:  # in the worker
    ignore_preemption_signals()  # the trainer checkpoints first, then closes this pool
    if initializer is not None:
        initializer()
    for name in preload:  # slow imports (sympy, math-verify, reasoning-gym) before the first call's clock
        importlib.import_module(name)
    try:  # answers are evaluated in this process from here on: no new processes, exec or signals
        jail.install_seccomp(jail.DENY_ALWAYS + jail.DENY_VERIFIER, threads_only=True)
    except OSError:
        pass
    guard = StateGuard()
    while True:
        try:
            job = conn.recv()  # from the trainer (trusted); unpickling `fn` imports its module, untimed
        except (EOFError, OSError):
            return
        if job is None:
            return
        fn, arg, prepare = job
        try:
            fresh = prepare(arg) if prepare is not None else False
        except Exception as e:  # noqa: BLE001  reported to the caller as this call's error
            _send(conn, ["error", f"preparing the call failed: {type(e).__name__}: {e}"])
            continue
        # a `prepare` that did new work (it returns True) may have imported modules or set lazily built
        # globals, from trusted data: the snapshot takes them in
        if fresh or len(sys.modules) != guard.n:
            guard = StateGuard()
        _send(conn, ["started", None])  # the call's time limit runs from here
        try:
            msg = ["ok", fn(arg)]
        except Exception as e:  # noqa: BLE001  reported to the caller as this call's error
            msg = ["error", f"{type(e).__name__}: {e}"]
        where = guard.changed()
        if where is not None:  # the answer patched the verifier: report it, and end this tainted worker
            _send(conn, ["tampered", f"the answer changed the verifier's state ({where})"])
            return
        _send(conn, msg)


class _NotStarted(Exception):
    """The worker failed before the call began (it died starting up, or while it was replaced)."""


def _receive(conn) -> tuple[str, Any]:
    """One message of a worker: JSON, parsed, never unpickled; a malformed one raises OSError (a broken
    worker)."""
    try:
        msg = json.loads(conn.recv_bytes(64 << 20))
        status, value = msg
    except (ValueError, TypeError) as e:
        raise OSError(f"malformed message from the worker: {e}") from e
    if status not in ("started", "ok", "error", "tampered"):
        raise OSError(f"malformed message from the worker: status {status!r}")
    return status, value


class _Worker:
    def __init__(self, ctx, initializer: Optional[Callable[[], None]], preload: Sequence[str],
                 ro_paths: Sequence[str] = ()) -> None:
        self.conn, child = ctx.Pipe()
        self.uid: Optional[int] = None
        if initializer is confine:  # the default: confined, under a sandbox uid of its own when we are root
            from nemo_prorl.confine.sandbox import UIDS

            self.uid = UIDS.take() if os.getuid() == 0 else None
            initializer = functools.partial(confine, tuple(ro_paths), self.uid)
        self.proc = track(ctx.Process(target=_serve, args=(child, initializer, tuple(preload)), daemon=True))
        self.proc.start()
        # Taken now, while the worker cannot have been reaped (it runs until told to stop): every later
        # signal goes through it, never through a pid that another pool thread's Process.start() (which
        # reaps exited children) may have freed for reuse
        self.pidfd: Optional[int] = _pidfd(self.proc.pid)
        child.close()
        self.stuck = False  # it never began a call it was given: replace it
        self.calls = 0

    def call(self, fn: Callable, arg: Any, timeout: float, *, prepare: Optional[Callable] = None,
             start_timeout: float) -> Outcome:
        """Run fn(arg) with `timeout` seconds from the moment the worker begins it: its start-up (a fresh
        worker's imports, `prepare`) is bounded by `start_timeout` instead. Raises _NotStarted when the
        worker died before beginning the call."""
        try:
            self.conn.send((fn, arg, prepare))
        except (EOFError, OSError) as e:
            raise _NotStarted(self._died(e)) from e
        except Exception as e:  # noqa: BLE001  e.g. an argument that cannot be pickled; nothing was sent
            return Outcome("error", reason=f"could not send the call: {type(e).__name__}: {e}")
        try:
            if not self.conn.poll(start_timeout):
                self.stuck = True
                return Outcome("error", reason=f"worker did not start the call within {start_timeout:g} s; killed")
            status, value = _receive(self.conn)
        except (EOFError, OSError) as e:
            raise _NotStarted(self._died(e)) from e
        if status != "started":
            return Outcome("error", reason=value)
        try:
            if not self.conn.poll(timeout):
                return Outcome("timeout", reason=f"no result within {timeout:g} s; worker killed")
            status, value = _receive(self.conn)
            self.calls += 1
        except (EOFError, OSError) as e:
            return Outcome("error", reason=self._died(e))
        if status == "tampered":
            return Outcome("tampered", reason=value)
        return Outcome("ok", value) if status == "ok" else Outcome("error", reason=value)

    def _died(self, e: BaseException) -> str:
        # The connection closes when the jailed process exits; its parent outside the PID namespace
        # passes the exit status on a moment later (longer on a busy machine).
        self.proc.join(timeout=10)
        return f"worker died (exit code {self.proc.exitcode}): {e}"

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        """Kill the worker's whole process tree and wait until it is gone, then give its uid back (which
        kills whatever still runs under the uid: a second line, as root)."""
        if self.pidfd is not None:
            if not _kill_tree(self.proc.pid, self.pidfd):
                log.error("a killed verifier worker (pid %s) still had processes after 60 s", self.proc.pid)
            os.close(self.pidfd)
            self.pidfd = None
        else:  # no pidfds here (not Linux >= 5.3): the worker itself; its jail is Linux-only anyway
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()
        if self.uid is not None:
            from nemo_prorl.confine.sandbox import UIDS

            UIDS.give(self.uid)
            self.uid = None


def _pidfd(pid: int) -> Optional[int]:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # another OS, or a kernel (or container filter) without pidfds
        return None


def _kill_tree(pid: int, pidfd: int, wait_s: float = 60.0) -> bool:
    """SIGKILL the worker process `pid` (signalled only through `pidfd`, its pidfd taken at its start) and
    its children, and wait until they are gone; False if some child outlived `wait_s` (stuck in the kernel).

    Why this way (issue 29): the answer runs in a child of `proc`, PID 1 of a PID namespace of its own and
    under another uid, so killing `proc` alone left it computing. `proc` is stopped first (a stopped process
    can neither fork nor reap, so its children's pids stay theirs, also during its start-up), then each child
    is taken by a pidfd (one process, immune to pid reuse; checked to still be `proc`'s child after the
    open), killed, and waited for. PID 1 of a namespace ends only after the kernel killed and reaped every
    process in it, so a readable pidfd means the whole tree is gone. (A cgroup would need a delegated cgroup
    v2 tree, which an unprivileged trainer seldom has; a pid reported by `proc` would race with a kill
    during its start-up.)"""
    # Through the pidfd (issue 29 review): another pool thread's Process.start() reaps exited children, so
    # between a check of the exit code and a kill by pid the worker could be reaped and its pid reused.
    # Once stopped and not exited it cannot be reaped, so its children's parent pid is still `pid`.
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
    except ProcessLookupError:  # exited (its PID 1 child, if any, got the death signal then)
        return True
    _wait_stopped(pid)
    fds = []
    for child in _children(pid):
        try:
            fd = os.pidfd_open(child)
        except OSError:
            continue
        if _parent(child) == pid:
            fds.append(fd)
        else:  # it died and the pid was reused between the scan and the open
            os.close(fd)
    for fd in fds:
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + wait_s
    gone = True
    for fd in fds:
        gone = _ready(fd, deadline - time.monotonic()) and gone
        os.close(fd)
    return gone


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses): state, ppid, ..."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _parent(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[1]) if len(fields) > 1 else -1


def _wait_stopped(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = (_stat_fields(pid) or ["X"])[0]
        if state in ("T", "t", "Z", "X"):
            return
        time.sleep(0.001)


def _children(pid: int) -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and _parent(int(n)) == pid]


# A worker is replaced after this many calls: state an answer changed in a way the guard does not see
# (an object mutated in place) lasts for a bounded number of answers. A reasoning-gym worker starts in a
# few seconds, so this costs well under 1% of a worker's time.
RECYCLE_CALLS = 2000


class HardTimeoutPool:
    """`num_workers` worker processes, started on first use and replaced when one is killed or dies.

    A call's time limit covers fn(arg) only. A worker's start-up (spawn, `initializer`, `preload` imports)
    and the call's `prepare(arg)` are bounded by `start_timeout` instead, so a call never times out
    because its worker was new or being replaced (a busy machine can take seconds to start one); a call
    whose worker died before beginning it is retried once on a fresh worker.
    """

    def __init__(self, num_workers: int, initializer: Optional[Callable[[], None]] = confine, *,
                 preload: Sequence[str] = (), start_timeout: float = 300.0, ro_paths: Sequence[str] = ()) -> None:
        """`ro_paths`: folders a confined worker must import from besides the environment and this package
        (tests that send functions of their own module)."""
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        self.num_workers = num_workers
        self.initializer = initializer
        if initializer is confine:  # built at launch: an unusable uid lock folder fails the run here
            from nemo_prorl.confine.sandbox import check_sandbox_uids

            check_sandbox_uids()
        self.preload = tuple(preload)
        self.ro_paths = tuple(ro_paths)
        self.start_timeout = start_timeout
        self._ctx = mp.get_context("spawn")
        self._idle: "queue.Queue[_Worker]" = queue.Queue()
        self._started = 0
        self._lock = threading.Lock()

    def _new_worker(self) -> _Worker:
        return _Worker(self._ctx, self.initializer, self.preload, self.ro_paths)

    def _acquire(self) -> _Worker:
        with self._lock:
            if self._idle.empty() and self._started < self.num_workers:
                self._started += 1
                return self._new_worker()
        return self._idle.get()

    def _release(self, w: _Worker, outcome: Optional[Outcome]) -> None:
        if outcome is None or outcome.status in ("timeout", "tampered") or w.stuck or not w.alive \
                or w.calls >= RECYCLE_CALLS:
            w.kill()
            w = self._new_worker()
        self._idle.put(w)

    def call(self, fn: Callable, arg: Any, timeout: float, *, prepare: Optional[Callable] = None) -> Outcome:
        """fn(arg) in a worker, killed past `timeout` seconds; `prepare(arg)` (untimed: e.g. building the
        data a scorer needs) runs in the same worker first."""
        why = ""
        for _ in range(2):
            w = self._acquire()
            outcome: Optional[Outcome] = None
            try:
                outcome = w.call(fn, arg, timeout, prepare=prepare, start_timeout=self.start_timeout)
                return outcome
            except _NotStarted as e:
                why = str(e)
            finally:
                self._release(w, outcome)
        return Outcome("error", reason=why)

    def map(self, fn: Callable, args: Sequence[Any], timeout: float, *,
            prepare: Optional[Callable] = None) -> list[Outcome]:
        """Run fn over args on the workers; results in order. Never raises for a failing call."""
        if not args:
            return []
        out: list[Optional[Outcome]] = [None] * len(args)
        todo: "queue.Queue[int]" = queue.Queue()
        for i in range(len(args)):
            todo.put(i)

        def drive() -> None:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    out[i] = self.call(fn, args[i], timeout, prepare=prepare)
                except Exception as e:  # noqa: BLE001  e.g. a worker that cannot be started: this row's error
                    out[i] = Outcome("error", reason=f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=drive, daemon=True) for _ in range(min(self.num_workers, len(args)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out  # type: ignore[return-value]

    def close(self) -> None:
        while not self._idle.empty():
            w = self._idle.get_nowait()
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.kill()
        self._started = 0
