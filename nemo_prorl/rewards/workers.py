"""A pool of worker processes with a hard per-call time limit. Verifiers such as Math-Verify and sympy
are pure Python but can spin for minutes on a pathological expression (`2^{2^{2^{100}}}`), and big-integer
arithmetic in C never returns to the interpreter to see a signal. So a call that exceeds its limit gets its
worker killed and replaced; the call is reported as timed out and the pool keeps serving.

Workers are started with the "spawn" method (no copy of the trainer's threads, CUDA context or memory) and
live as long as the pool. `fn` must be importable by name (a module-level function).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import resource
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from nemo_prorl.procs import ignore_preemption_signals, track


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok", "error" (fn raised, or the worker died) or "timeout"
    value: Any = None
    reason: str = ""


def confine() -> None:
    """Runs in each worker before its first call. Verifiers parse model output with sympy's parse_expr (an
    eval), and some reasoning-gym scorers eval it outright, so what runs here may be the model's code: give
    it no secrets (environment scrubbed), no network (an empty network namespace where the kernel allows)
    and a memory cap. The file system stays visible; programs that are meant to run go to the sandbox."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONHASHSEED", "TMPDIR") if k in os.environ}
    os.environ.clear()
    os.environ.update(keep)
    for res, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_AS, 8 << 30)):
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            pass
    if sys.platform.startswith("linux"):
        from nemo_prorl.rewards.sandbox_runner import unshare_network

        try:
            unshare_network()
        except OSError:
            pass  # containers may forbid namespaces; the rest still applies


def _serve(conn, initializer: Optional[Callable[[], None]], preload: Sequence[str]) -> None:  # in the worker
    ignore_preemption_signals()  # the trainer checkpoints first, then closes this pool
    if initializer is not None:
        initializer()
    for name in preload:  # slow imports (sympy, math-verify, reasoning-gym) before the first call's clock
        importlib.import_module(name)
    while True:
        try:
            job = conn.recv()  # unpickling `fn` imports its module: not part of the call's time either
        except (EOFError, OSError):
            return
        if job is None:
            return
        fn, arg, prepare = job
        try:
            if prepare is not None:
                prepare(arg)
        except Exception as e:  # noqa: BLE001  reported to the caller as this call's error
            conn.send(("error", f"preparing the call failed: {type(e).__name__}: {e}"))
            continue
        conn.send(("started", None))  # the call's time limit runs from here
        try:
            conn.send(("ok", fn(arg)))
        except Exception as e:  # noqa: BLE001  reported to the caller as this call's error
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _NotStarted(Exception):
    """The worker failed before the call began (it died starting up, or while it was replaced)."""


class _Worker:
    def __init__(self, ctx, initializer: Optional[Callable[[], None]], preload: Sequence[str]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = track(ctx.Process(target=_serve, args=(child, initializer, tuple(preload)), daemon=True))
        self.proc.start()
        child.close()
        self.stuck = False  # it never began a call it was given: replace it

    def call(self, fn: Callable, arg: Any, timeout: float, *, prepare: Optional[Callable] = None,
             start_timeout: float) -> Outcome:
        """Run fn(arg) with `timeout` seconds from the moment the worker begins it: its start-up (a fresh
        worker's imports, `prepare`) is bounded by `start_timeout` instead. Raises _NotStarted when the
        worker died before beginning the call."""
        try:
            self.conn.send((fn, arg, prepare))
        except (EOFError, OSError) as e:
            raise _NotStarted(f"worker died (exit code {self.proc.exitcode}): {e}") from e
        except Exception as e:  # noqa: BLE001  e.g. an argument that cannot be pickled; nothing was sent
            return Outcome("error", reason=f"could not send the call: {type(e).__name__}: {e}")
        try:
            if not self.conn.poll(start_timeout):
                self.stuck = True
                return Outcome("error", reason=f"worker did not start the call within {start_timeout:g} s; killed")
            status, value = self.conn.recv()
        except (EOFError, OSError) as e:
            raise _NotStarted(f"worker died (exit code {self.proc.exitcode}): {e}") from e
        if status != "started":
            return Outcome("error", reason=value)
        try:
            if not self.conn.poll(timeout):
                return Outcome("timeout", reason=f"no result within {timeout:g} s; worker killed")
            status, value = self.conn.recv()
        except (EOFError, OSError) as e:
            return Outcome("error", reason=f"worker died (exit code {self.proc.exitcode}): {e}")
        return Outcome("ok", value) if status == "ok" else Outcome("error", reason=value)

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class HardTimeoutPool:
    """`num_workers` worker processes, started on first use and replaced when one is killed or dies.

    A call's time limit covers fn(arg) only. A worker's start-up (spawn, `initializer`, `preload` imports)
    and the call's `prepare(arg)` are bounded by `start_timeout` instead, so a call never times out
    because its worker was new or being replaced (a busy machine can take seconds to start one); a call
    whose worker died before beginning it is retried once on a fresh worker.
    """

    def __init__(self, num_workers: int, initializer: Optional[Callable[[], None]] = confine, *,
                 preload: Sequence[str] = (), start_timeout: float = 300.0) -> None:
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        self.num_workers = num_workers
        self.initializer = initializer
        self.preload = tuple(preload)
        self.start_timeout = start_timeout
        self._ctx = mp.get_context("spawn")
        self._idle: "queue.Queue[_Worker]" = queue.Queue()
        self._started = 0
        self._lock = threading.Lock()

    def _new_worker(self) -> _Worker:
        return _Worker(self._ctx, self.initializer, self.preload)

    def _acquire(self) -> _Worker:
        with self._lock:
            if self._idle.empty() and self._started < self.num_workers:
                self._started += 1
                return self._new_worker()
        return self._idle.get()

    def _release(self, w: _Worker, outcome: Optional[Outcome]) -> None:
        if outcome is None or outcome.status == "timeout" or w.stuck or not w.alive:
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
                out[i] = self.call(fn, args[i], timeout, prepare=prepare)

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
