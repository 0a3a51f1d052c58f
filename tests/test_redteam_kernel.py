"""Red team (issue 29, item 2): kernel objects outside the sandbox's memory budget.

The runner's budget counts the resident memory of the sandbox's processes, and RLIMIT_AS bounds each
one's address space. Kernel objects are neither: a program that makes SysV semaphore sets, AIO contexts,
POSIX timers, inotify instances, POSIX locks or pipe and socket buffers holds host memory (or host-wide
quotas such as /proc/sys/fs/aio-nr) that no budget sees. Every attack here allocates as much as it can
(capped well under what would hurt this machine), holds it for a while, then prints the right answer.
While it runs the test samples the host: MemAvailable must not fall by more than the budget plus a margin,
the host's own io_setup must keep working, and afterwards nothing is left (processes, files, AIO events).
Each family is refused by the seccomp filter (jail.DENY_ALWAYS, jail.REFUSED_ARGS) or bounded by an
rlimit (confine/runner._limits): the program's own report says which.

Variants: the trainer's identity with its venv interpreter (root here: the root-namespace path of the
sandbox), and an unprivileged runner (uid 1000 via setpriv, system interpreter: the user-namespace path,
where the program's objects count against the trainer's own uid).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import threading
import time
from pathlib import Path

import pytest

from nemo_prorl.config.schema import RewardConfig, SandboxConfig
from nemo_prorl.rewards import RewardInput
from nemo_prorl.rewards.code import CodeReward
from nemo_prorl.confine.sandbox import _namespaces_available
from tests.test_sandbox_redteam import GOOD, SETPRIV, STDIO, SYSTEM_PY, _left_behind, _state, fenced

pytestmark = pytest.mark.skipif(not _namespaces_available(), reason="this kernel forbids namespaces")

MEMORY_MB = 512
MARGIN_MB = 512  # other work on the machine moves MemAvailable too; every old attack took > 1 GiB more
EPERM = 1
# io_setup, io_destroy (the unistd tables: x86_64, and asm-generic for aarch64)
AIO_NR = {"x86_64": (206, 207), "aarch64": (0, 1)}[platform.machine()]


@pytest.fixture(scope="module", params=["trainer-venv", "uid1000-system"])
def reward(request):
    # time limits wide enough that an attack holds its objects while the host is sampled
    cfg = SandboxConfig(total_timeout_s=30.0, per_test_timeout_s=20.0, cpu_time_s=15, memory_mb=MEMORY_MB,
                        max_file_bytes=4 << 20, num_workers=1, disk_mb=16,
                        max_output_bytes=1 << 18, max_run_output_bytes=1 << 20)
    if request.param.endswith("system"):
        if not os.path.exists(SYSTEM_PY):
            pytest.skip("no system interpreter")
        cfg.python = SYSTEM_PY
    r = CodeReward(RewardConfig(sandbox=cfg))
    if request.param.startswith("uid1000"):
        if os.getuid() != 0 or SETPRIV is None:
            pytest.skip("needs root and setpriv to start the runner as another user")
        r.sandbox.runner_prefix = [SETPRIV, "--reuid", "1000", "--regid", "1000", "--clear-groups"]
    r.variant = request.param
    yield r
    r.close()


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) << 10
    raise AssertionError("/proc/meminfo has no MemAvailable")


def _aio_nr() -> int:
    return int(Path("/proc/sys/fs/aio-nr").read_text())


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _host_io_setup() -> int:
    """The host's own io_setup (as a database or a data loader would call it): 0, or its errno."""
    ctx = ctypes.c_ulong(0)
    if _libc.syscall(AIO_NR[0], 128, ctypes.byref(ctx)) != 0:
        return ctypes.get_errno()
    _libc.syscall(AIO_NR[1], ctx)
    return 0


class HostWatch:
    """Samples the host while an attack runs: the lowest MemAvailable, the highest aio-nr and every
    failure of the host's own io_setup."""

    def __init__(self) -> None:
        self.mem0, self.aio0 = _mem_available(), _aio_nr()
        self.mem_min, self.aio_max, self.io_setup_errors = self.mem0, self.aio0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self.mem_min = min(self.mem_min, _mem_available())
            self.aio_max = max(self.aio_max, _aio_nr())
            err = _host_io_setup()
            if err:
                self.io_setup_errors.append(err)

    def __enter__(self) -> "HostWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def figures(self) -> str:
        return (f"MemAvailable fell by {(self.mem0 - self.mem_min) >> 20} MiB, aio-nr {self.aio0} -> "
                f"max {self.aio_max}, host io_setup failures {len(self.io_setup_errors)}")


def _ours(thing, reward) -> bool:
    """Whether a leftover that `_left_behind` reports is the sandbox's: processes and mounts are; a file
    only when a sandbox uid owns it (other test files running at the same time make prorl-* folders)."""
    if not (isinstance(thing, tuple) and isinstance(thing[0], str)):
        return True
    uids = set(reward.sandbox.uids_used) | ({1000} if reward.variant.startswith("uid1000") else set())
    try:
        return os.stat(os.path.join(*thing)).st_uid in uids
    except OSError:
        return False  # gone already


def _kernel_attack(reward, code: str) -> dict:
    """Run the attack once (stdin "1 2"), watching the host; returns the program's own report (the JSON
    line it writes last to stderr) with the figures. Checks the host after: nothing left behind, aio-nr
    back to where it was, and a correct program scores 1.0."""
    sem0 = Path("/proc/sysvipc/sem").read_text()
    before = _state()
    with HostWatch() as watch:
        run = reward.sandbox.run(code, [STDIO["inputs"][0]])
    figures = watch.figures()
    print(reward.variant, figures)  # the measured figures (pytest -s)
    assert run.error == "" and run.tests, run
    test = run.tests[0]
    lines = [ln for ln in test.stderr.splitlines() if ln.startswith("{")]
    assert lines, f"the attack did not report ({test.status}): {test.stderr[-1000:]}"
    report = json.loads(lines[-1])
    print(reward.variant, "report", report)
    for _ in range(50):  # the kernel frees a dead namespace's objects asynchronously
        left = [x for x in _left_behind(before, reward) if _ours(x, reward)]
        if not left and _aio_nr() <= watch.aio0:
            break
        time.sleep(0.1)
    assert left == [], left
    assert _aio_nr() <= watch.aio0, f"AIO events left reserved: {watch.aio0} -> {_aio_nr()}"
    assert Path("/proc/sysvipc/sem").read_text() == sem0  # no semaphore set in the host's IPC namespace
    assert watch.io_setup_errors == [], f"the host's io_setup failed during the attack: {figures}"
    assert watch.mem0 - watch.mem_min < (MEMORY_MB + MARGIN_MB) << 20, figures
    ok = reward.score(RewardInput(response=fenced(GOOD), ground_truth=json.dumps(STDIO)))
    assert ok.reward == 1.0, ok  # a correct program scores 1 right after
    report["test_status"], report["stdout"] = test.status, test.stdout
    return report


# The attack programs share a prologue: the call numbers of both architectures, a report written to
# stderr (the last JSON line), and an answer printed at the end, so that only containment can fail them.
PROLOGUE = """
import ctypes, json, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
X86 = os.uname().machine == 'x86_64'
NR = dict(semget=64 if X86 else 190, io_setup=206 if X86 else 0, timer_create=222 if X86 else 107,
          inotify_init1=294 if X86 else 26)
report = {'got': 0, 'errno': 0}
def refused(e):
    report['errno'] = e
def done(hold=2.0):
    time.sleep(hold)  # hold the objects while the host is sampled
    print(json.dumps(report), file=sys.stderr, flush=True)
    a, b = map(int, input().split())
    print(a + b)
"""

SEMAPHORES = PROLOGUE + """
for _ in range(700):  # sets of 32000 semaphores: about 2 MiB of kernel memory each, 1.4 GiB in all
    if libc.syscall(NR['semget'], 0, 32000, 0o600) < 0:
        refused(ctypes.get_errno())
        break
    report['got'] += 1
done()
"""

AIO = PROLOGUE + """
ctx = ctypes.c_ulong(0)
for _ in range(64):  # 4096 events each: the host's aio-max-nr (65536 by default) is gone after 16
    ctx.value = 0
    if libc.syscall(NR['io_setup'], 4096, ctypes.byref(ctx)) != 0:
        refused(ctypes.get_errno())
        break
    report['got'] += 4096
done()
"""

TIMERS = PROLOGUE + """
tid = ctypes.c_int(0)
for _ in range(100000):  # POSIX timers: a kernel timer and a preallocated signal each
    if libc.syscall(NR['timer_create'], 1, None, ctypes.byref(tid)) != 0:
        refused(ctypes.get_errno())
        break
    report['got'] += 1
done()
"""

INOTIFY = PROLOGUE + """
for _ in range(200):  # inotify instances count against the uid's host-wide quota (max_user_instances)
    if libc.syscall(NR['inotify_init1'], 0) < 0:
        refused(ctypes.get_errno())
        break
    report['got'] += 1
done()
"""

LOCKS = PROLOGUE + """
import fcntl
try:
    for k in range(40):  # short lists (the kernel scans a file's whole list per lock): many files
        f = open(f'locks{k}', 'wb')
        for i in range(1500, 0, -1):  # every other byte: each a lock (192 bytes of kernel memory) of its own
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 2 * i)
            report['got'] += 1
except OSError as e:
    refused(e.errno)
done()
"""

LANDLOCK = PROLOGUE + """
import struct
attr = ctypes.create_string_buffer(struct.pack('QQ', 0, 1), 16)  # a ruleset handling TCP bind
try:
    for _ in range(20):
        fd = libc.syscall(444, attr, 16, 0)  # landlock_create_ruleset
        if fd < 0:
            raise OSError(ctypes.get_errno(), 'landlock_create_ruleset')
        for port in range(65536):  # a rule (64 bytes of kernel memory) per port, no limit on rules
            rule = ctypes.create_string_buffer(struct.pack('QQ', 1, port), 16)
            if libc.syscall(445, fd, 2, rule, 0) != 0:
                raise OSError(ctypes.get_errno(), 'landlock_add_rule')
            report['got'] += 1
except OSError as e:
    refused(e.errno)
done()
"""

# Forked children hold buffers in pipes and socket pairs: none of it is resident memory of a process.
PIPES = PROLOGUE + """
import fcntl
r, w = os.pipe()
for k in range(20):
    pid = os.fork()
    if pid == 0:
        got, err = 0, 0
        for _ in range(28):
            a, b = os.pipe()
            try:
                fcntl.fcntl(b, 1031, 1 << 20)  # F_SETPIPE_SZ: 1 MiB, not counted in RLIMIT_AS
            except OSError as e:
                err = e.errno
            os.set_blocking(b, False)
            try:
                while True:
                    got += os.write(b, b'x' * 65536)
            except BlockingIOError:
                pass
        os.write(w, json.dumps([got, err]).encode() + b'\\n')
        time.sleep(3)
        os._exit(0)
os.close(w)
for line in os.fdopen(r).read().splitlines():
    got, err = json.loads(line)
    report['got'] += got
    report['errno'] = report['errno'] or err
done(0.5)
"""

SOCKETS = PROLOGUE + """
import socket
r, w = os.pipe()
for k in range(20):
    pid = os.fork()
    if pid == 0:
        got, err, pairs = 0, 0, []
        for _ in range(28):
            a, b = socket.socketpair()
            pairs.append((a, b))
            for s in (a, b):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 20)  # clamped to wmem_max
                except OSError as e:
                    err = e.errno
                s.setblocking(False)
                try:
                    while got < (80 << 20):
                        got += s.send(b'x' * 65536)
                except BlockingIOError:
                    pass
        os.write(w, json.dumps([got, err]).encode() + b'\\n')
        time.sleep(3)
        os._exit(0)
os.close(w)
for line in os.fdopen(r).read().splitlines():
    got, err = json.loads(line)
    report['got'] += got
    report['errno'] = report['errno'] or err
done(0.5)
"""


@pytest.mark.parametrize("name,code", [("semget", SEMAPHORES), ("io_setup", AIO), ("timer_create", TIMERS),
                                       ("inotify", INOTIFY), ("posix_locks", LOCKS), ("landlock", LANDLOCK)])
def test_kernel_objects_are_refused(reward, name, code):
    """Families with no per-process bound: the filter refuses the first call (EPERM), and the program's
    right answer still scores (refused, not crashed)."""
    report = _kernel_attack(reward, code)
    assert report["got"] == 0 and report["errno"] == EPERM, (name, report)
    assert report["test_status"] == "ok" and report["stdout"] == STDIO["outputs"][0], report


def _default_buffer(name: str) -> int:
    """The most one descriptor of the attack buffers at its default size (plus one 64 KiB write)."""
    size = 65536 if name == "pipe_buffers" else int(Path("/proc/sys/net/core/wmem_default").read_text())
    return size + 65536


@pytest.mark.parametrize("name,code", [("pipe_buffers", PIPES), ("socket_buffers", SOCKETS)])
def test_buffers_are_bounded(reward, name, code):
    """Pipes and socket pairs stay (asyncio, subprocess and multiprocessing need them), at their default
    sizes: growing a buffer (F_SETPIPE_SZ, SO_SNDBUF) is refused, so what 20 processes of 56 descriptors
    each buffer is bounded by descriptors x the default size (and the host's memory check holds)."""
    report = _kernel_attack(reward, code)
    assert report["errno"] == EPERM, (name, report)
    assert report["got"] <= 20 * 56 * _default_buffer(name), (name, report)


# vmsplice puts references to the caller's own pages in a pipe: a slot referencing one byte of a
# transparent huge page keeps the whole 2 MiB page alive after the program unmaps it (16 slots: 32 MiB per
# pipe, none of it resident in any process). Forked children so the total is well beyond the budget and the
# margin (2 x 28 pipes x 16 slots x 2 MiB = 1.75 GiB under the old filter, bounded so the host survives).
VMSPLICE = PROLOGUE + """
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
class Iovec(ctypes.Structure):
    _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]
VMSPLICE_NR, HUGE = (278 if X86 else 75), 2 << 20
r, w = os.pipe()
for k in range(2):
    pid = os.fork()
    if pid == 0:
        got, err, pipes = 0, 0, []
        for _ in range(28):
            a, b = os.pipe()
            pipes.append((a, b))
            for _ in range(16):
                m = libc.mmap(None, 2 * HUGE, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
                if m is None or m == ctypes.c_void_p(-1).value:
                    err = ctypes.get_errno() or 12
                    break
                page = (m + HUGE - 1) & ~(HUGE - 1)
                libc.madvise(page, HUGE, 14)  # MADV_HUGEPAGE
                ctypes.memset(page, 1, HUGE)
                n = libc.syscall(VMSPLICE_NR, b, ctypes.byref(Iovec(page, 1)), 1, 0)
                if n != 1:
                    err = ctypes.get_errno()
                libc.munmap(m, 2 * HUGE)  # only the pipe holds the page now
                if n != 1:
                    break
                got += 1
            if err:
                break
        os.write(w, json.dumps([got, err]).encode() + b'\\n')
        time.sleep(3)
        os._exit(0)
os.close(w)
for line in os.fdopen(r).read().splitlines():
    got, err = json.loads(line)
    report['got'] += got
    report['errno'] = report['errno'] or err
done(0.5)
"""


def test_vmsplice_cannot_pin_pages(reward):
    """vmsplice is refused (EPERM): a pipe cannot hold the program's unmapped huge pages, and the host's
    memory stays within the budget plus the margin (_kernel_attack checks it)."""
    report = _kernel_attack(reward, VMSPLICE)
    assert report["got"] == 0 and report["errno"] == EPERM, report
    assert report["test_status"] == "ok" and report["stdout"] == STDIO["outputs"][0], report


FD_OBJECTS = PROLOGUE + """
import select, socket
made = []
kinds = [lambda: os.eventfd(0), lambda: select.epoll(), lambda: os.pipe(), lambda: socket.socketpair(),
         lambda: libc.syscall(289 if X86 else 74, -1, ctypes.byref(ctypes.c_ulong(1 << 9)), 8, 0),
         lambda: libc.syscall(283 if X86 else 85, 1, 0)]  # signalfd4(-1, {SIGUSR1}), timerfd_create
try:
    for _ in range(1000):
        for make in kinds:
            x = make()
            if isinstance(x, int) and x < 0:
                raise OSError(ctypes.get_errno(), 'refused')
            made.append(x)
            report['got'] += 1
except OSError as e:
    refused(e.errno)
done(0.1)
"""


def test_descriptor_objects_are_bounded_by_the_open_files_limit(reward):
    """eventfd, epoll, pipes, socket pairs, signalfd and timerfd are descriptors: RLIMIT_NOFILE (64)
    bounds them per process (EMFILE)."""
    report = _kernel_attack(reward, FD_OBJECTS)
    assert report["errno"] == 24 and report["got"] < 64, report  # EMFILE


MEMLOCK = PROLOGUE + """
import mmap, resource
report['memlock'] = resource.getrlimit(resource.RLIMIT_MEMLOCK)
report['msgqueue'] = resource.getrlimit(resource.RLIMIT_MSGQUEUE)
report['sigpending'] = resource.getrlimit(resource.RLIMIT_SIGPENDING)
m = mmap.mmap(-1, 1 << 20)
buf = ctypes.c_char.from_buffer(m)
if libc.mlock(ctypes.byref(buf), 1 << 20) != 0:
    refused(ctypes.get_errno())
else:
    report['got'] = 1
del buf
done(0.1)
"""


def test_locked_memory_and_queues_have_no_allowance(reward):
    """RLIMIT_MEMLOCK, RLIMIT_MSGQUEUE are 0 and RLIMIT_SIGPENDING small: no pinned memory, no POSIX
    queue bytes, few queued signals."""
    report = _kernel_attack(reward, MEMLOCK)
    assert report["got"] == 0 and report["errno"] == EPERM, report
    assert report["memlock"] == [0, 0] and report["msgqueue"] == [0, 0], report
    assert 0 < report["sigpending"][0] <= 1024, report


def _filtered_calls() -> dict:
    """In a child under DENY_ALWAYS: what the everyday forms of the argument-checked calls return."""
    import fcntl
    import socket
    import tempfile

    out = {}

    def attempt(name, call):
        try:
            call()
            out[name] = "ok"
        except OSError as e:
            out[name] = e.errno

    r, w = os.pipe()
    a, b = socket.socketpair()
    with tempfile.TemporaryFile() as f:
        attempt("F_SETFL", lambda: os.set_blocking(w, False))  # F_GETFL, F_SETFL
        attempt("F_DUPFD_CLOEXEC", lambda: os.close(fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 10)))
        attempt("F_GETPIPE_SZ", lambda: fcntl.fcntl(w, 1032))
        attempt("F_GETLK", lambda: fcntl.fcntl(f, fcntl.F_GETLK, bytes(32)))
        attempt("flock", lambda: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB))
        attempt("SO_REUSEADDR", lambda: a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1))
        attempt("get SO_SNDBUF", lambda: a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        attempt("F_SETPIPE_SZ", lambda: fcntl.fcntl(w, 1031, 1 << 20))
        os.write(w, b"x")
        r2, w2 = os.pipe()

        def tee():
            if _libc.syscall(276 if platform.machine() == "x86_64" else 77, r, w2, 1, 0) < 0:
                raise OSError(ctypes.get_errno(), "tee")

        def sendfile():  # file -> pipe (shutil and socket.sendfile use it): stays
            f.write(b"ab")
            f.flush()
            os.sendfile(w2, f.fileno(), 0, 1)

        attempt("tee", tee)
        attempt("splice", lambda: os.splice(r, w2, 1))
        attempt("sendfile", sendfile)
        attempt("F_SETLK", lambda: fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0))
        attempt("F_OFD_SETLK", lambda: fcntl.fcntl(f, 37, bytes(32)))
        for opt in ("SO_SNDBUF", "SO_RCVBUF", "SO_SNDBUFFORCE", "SO_RCVBUFFORCE"):
            attempt(opt, lambda: a.setsockopt(socket.SOL_SOCKET, getattr(socket, opt, 32 if "SND" in opt else 33),
                                              1 << 20))
    return out


def test_the_argument_rules_keep_everyday_calls():
    """The fcntl and setsockopt rules refuse buffer growth and record locks, and nothing else of those
    calls (non-blocking mode, duplication, flock, other socket options): checked on the filter itself."""
    from nemo_prorl.confine import jail

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            jail.install_seccomp(jail.DENY_ALWAYS)
            os.write(w, json.dumps(_filtered_calls()).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = json.loads(f.read() or "{}")
    os.waitpid(pid, 0)
    everyday = ("F_SETFL", "F_DUPFD_CLOEXEC", "F_GETPIPE_SZ", "F_GETLK", "flock", "SO_REUSEADDR", "get SO_SNDBUF",
                "sendfile")
    assert {k: got.get(k) for k in everyday} == dict.fromkeys(everyday, "ok"), got
    refused = ("F_SETPIPE_SZ", "F_SETLK", "F_OFD_SETLK", "SO_SNDBUF", "SO_RCVBUF", "SO_SNDBUFFORCE", "SO_RCVBUFFORCE",
               "tee", "splice")
    assert {k: got.get(k) for k in refused} == dict.fromkeys(refused, EPERM), got


# ---- the verifier workers (confine/workers.py) share DENY_ALWAYS --------------------------------------------

def _kernel_calls(_: object) -> dict:
    """In a confined verifier worker: what the kernel-object calls return."""
    import fcntl
    import tempfile

    x86 = platform.machine() == "x86_64"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    out = {}
    ctx = ctypes.c_ulong(0)
    tid = ctypes.c_int(0)
    for name, nr, args in (("semget", 64 if x86 else 190, (0, 16, 0o600)),
                           ("io_setup", 206 if x86 else 0, (16, ctypes.byref(ctx))),
                           ("timer_create", 222 if x86 else 107, (1, None, ctypes.byref(tid))),
                           ("inotify_init1", 294 if x86 else 26, (0,)),
                           ("landlock_create_ruleset", 444, (None, 0, 1))):
        out[name] = ctypes.get_errno() if libc.syscall(nr, *args) < 0 else "allowed"
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, 1031, 1 << 20)
        out["F_SETPIPE_SZ"] = "allowed"
    except OSError as e:
        out["F_SETPIPE_SZ"] = e.errno
    with tempfile.TemporaryFile() as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            out["lockf"] = "allowed"
        except OSError as e:
            out["lockf"] = e.errno
    return out


def test_verifier_workers_refuse_kernel_objects():
    from nemo_prorl.confine.workers import HardTimeoutPool

    pool = HardTimeoutPool(1, ro_paths=[str(Path(__file__).parent)])  # a confined worker imports this module
    try:
        got = pool.call(_kernel_calls, None, timeout=60)
    finally:
        pool.close()
    assert got.status == "ok", got
    assert got.value == {"semget": EPERM, "io_setup": EPERM, "timer_create": EPERM, "inotify_init1": EPERM,
                         "landlock_create_ruleset": EPERM, "F_SETPIPE_SZ": EPERM, "lockf": EPERM}, got.value
