"""Child processes and preemption signals.

Slurm signals every process of a job step at preemption (proctrack/cgroup). Only the trainer acts on it
(it checkpoints, then stops its children), so children ignore SIGTERM / SIGUSR1, and the trainer kills any
child still alive when it exits: multiprocessing's own exit handler would SIGTERM them and wait forever."""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  registers multiprocessing's exit handler now, so ours runs before it
import os
import signal
import subprocess
import weakref
from typing import Any, Optional, Sequence

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_CHILDREN: "weakref.WeakSet[Any]" = weakref.WeakSet()


def ignore_preemption_signals() -> None:
    """In a child process: leave SIGTERM / SIGUSR1 to the trainer."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def track(proc: Any) -> Any:
    """Remember a started multiprocessing.Process so that it is killed if still alive at exit."""
    _CHILDREN.add(proc)
    return proc


@atexit.register  # after multiprocessing's handler (imported above): atexit runs ours first
def _kill_leftovers() -> None:
    for proc in list(_CHILDREN):
        try:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        except (OSError, ValueError, AssertionError):  # already reaped, or not our child
            pass


def run_in_group(cmd: Sequence[str], timeout_s: float, **kwargs: Any) -> tuple[Optional[int], str, str]:
    """(exit code, stdout, stderr) of `cmd`, run in a session of its own; the exit code is None when it ran
    past `timeout_s`. Output goes to files, not pipes: a program's own children (vLLM's workers) may hold
    them after it exits. At the end, and when this process is told to stop (SIGTERM, SIGHUP), the whole
    process group is killed, so no engine is left holding a GPU."""
    import tempfile
    import threading

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    main = threading.current_thread() is threading.main_thread()
    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)} if main else {}
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, **kwargs)
            rc: Optional[int] = None
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
            finally:
                _kill_group(proc.pid)
                proc.wait()
            return rc, _read(out), _read(err)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _read(f: Any) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone
        pass
