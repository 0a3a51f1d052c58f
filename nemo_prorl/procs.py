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
    past `timeout_s`. The whole process group is killed at the end: a program's own children (vLLM's
    workers) hold its pipes, so killing the leader alone would leave the read waiting on them."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True, **kwargs)
    rc: Optional[int] = None
    try:
        out, err = proc.communicate(timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
    finally:
        _kill_group(proc.pid)
    return rc, out, err


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone
        pass
