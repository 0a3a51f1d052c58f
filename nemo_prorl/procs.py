"""Child processes and preemption signals.

Slurm signals every process of a job step at preemption (proctrack/cgroup). Only the trainer acts on it
(it checkpoints, then stops its children), so children ignore SIGTERM / SIGUSR1, and the trainer kills any
child still alive when it exits: multiprocessing's own exit handler would SIGTERM them and wait forever."""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  registers multiprocessing's exit handler now, so ours runs before it
import signal
import weakref
from typing import Any

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
