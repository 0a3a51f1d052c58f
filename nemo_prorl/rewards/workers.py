"""A pool of worker processes with a hard per-call time limit. Verifiers such as Math-Verify and sympy
are pure Python but can spin for minutes on a pathological expression (`2^{2^{2^{100}}}`), and big-integer
arithmetic in C never returns to the interpreter to see a signal. So a call that exceeds its limit gets its
worker killed and replaced; the call is reported as timed out and the pool keeps serving.

Workers are started with the "spawn" method (no copy of the trainer's threads, CUDA context or memory) and
live as long as the pool. `fn` must be importable by name (a module-level function).
"""

from __future__ import annotations

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


def _serve(conn, initializer: Optional[Callable[[], None]]) -> None:  # runs in the worker process
    ignore_preemption_signals()  # the trainer checkpoints first, then closes this pool
    if initializer is not None:
        initializer()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        fn, arg = job
        try:
            conn.send(("ok", fn(arg)))
        except Exception as e:  # noqa: BLE001  reported to the caller as this call's error
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx, initializer: Optional[Callable[[], None]]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = track(ctx.Process(target=_serve, args=(child, initializer), daemon=True))
        self.proc.start()
        child.close()

    def call(self, fn: Callable, arg: Any, timeout: float) -> Outcome:
        try:
            self.conn.send((fn, arg))
        except (EOFError, OSError) as e:
            return Outcome("error", reason=f"worker died (exit code {self.proc.exitcode}): {e}")
        except Exception as e:  # noqa: BLE001  e.g. an argument that cannot be pickled; nothing was sent
            return Outcome("error", reason=f"could not send the call: {type(e).__name__}: {e}")
        try:
            if not self.conn.poll(timeout):
                return Outcome("timeout", reason=f"no result within {timeout:g} s; worker killed")
            status, value = self.conn.recv()
        except (EOFError, OSError, BrokenPipeError) as e:
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
    def __init__(self, num_workers: int, initializer: Optional[Callable[[], None]] = confine) -> None:
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        self.num_workers = num_workers
        self.initializer = initializer
        self._ctx = mp.get_context("spawn")
        self._idle: "queue.Queue[_Worker]" = queue.Queue()
        self._started = 0
        self._lock = threading.Lock()

    def _acquire(self) -> _Worker:
        with self._lock:
            if self._idle.empty() and self._started < self.num_workers:
                self._started += 1
                return _Worker(self._ctx, self.initializer)
        return self._idle.get()

    def _release(self, w: _Worker, outcome: Outcome) -> None:
        if outcome.status == "timeout" or not w.alive:
            w.kill()
            w = _Worker(self._ctx, self.initializer)
        self._idle.put(w)

    def call(self, fn: Callable, arg: Any, timeout: float) -> Outcome:
        w = self._acquire()
        outcome = Outcome("error", reason="not run")
        try:
            outcome = w.call(fn, arg, timeout)
        finally:
            self._release(w, outcome)
        return outcome

    def map(self, fn: Callable, args: Sequence[Any], timeout: float) -> list[Outcome]:
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
                out[i] = self.call(fn, args[i], timeout)

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
