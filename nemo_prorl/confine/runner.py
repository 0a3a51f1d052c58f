"""The process that runs untrusted programs, started by `LocalSandbox` as `python -I -B runner.py`
with its spec (JSON) on stdin. Standard library only (plus jail.py): it must start fast and import
nothing of the trainer. It prints one JSON line: {"results": [...], "notes": [...]} or {"error": "..."}.

Containment (jail.py has the primitives and why each exists):
1. New user (unless real root), mount, network, IPC, UTS and PID namespaces. The network namespace is
   empty: no connect(), and no abstract unix sockets of the host.
2. The root file system is an allowlist: a tmpfs with read-only binds of the interpreter and the system
   libraries, /sbx (the program and the harness, read-only), /w (the only writable folder: a tmpfs of
   `disk_mb`, fresh for every test) and a few device nodes. The host's root is detached, so unmounting
   anything reveals nothing, and no data, checkpoint, model, home folder or socket of the host is there.
3. The runner is PID 1 of the new PID namespace with its own /proc: the trainer's processes and their
   environments are invisible, and when it exits the kernel kills whatever the program left.
4. Each test is a child that drops to an unprivileged uid, sets rlimits (CPU, address space, file size,
   open files, processes), no_new_privs and a seccomp filter, then execs a fresh interpreter. Stdin,
   stdout, stderr and the harness's result channel are memfds: nothing the program can replace with a
   FIFO or a folder, and no file of one test reaches the next.
5. While a test runs, PID 1 polls the namespace's processes: more than `max_processes` or more than
   `memory_mb` resident in all together kills the whole tree (rlimits alone are per process, so forks
   would multiply them; the filter refuses the kernel memory no process's resident size shows: SysV IPC
   and POSIX queues, memfds, AIO, POSIX timers, inotify/fanotify, landlock rules, record locks and grown
   pipe or socket buffers; issue 29). Wall time is enforced per test and in total, and output per test
   and over the run.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import sys
import time

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the stdlib: no shadowing
import jail  # noqa: E402  (a sibling module, imported without the trainer's package)

ROOT = "/tmp"  # where the new root is assembled, in the runner's private mount namespace
PROGRAM_DIR, WORK_DIR = "/sbx", "/w"
POLL_S = 0.02
PR_SET_CHILD_SUBREAPER = 36


def _emit(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def setup_jail(spec: dict) -> bool:
    """Namespaces and the new root (before the fork into the PID namespace); returns whether we are in
    a user namespace."""
    userns = jail.enter_namespaces(jail.CLONE_NEWNET | jail.CLONE_NEWPID | jail.CLONE_NEWIPC | jail.CLONE_NEWUTS)
    jail.build_root(ROOT, spec["ro_paths"], size_mb=1)
    os.makedirs(ROOT + PROGRAM_DIR)
    for name, text in spec["files"].items():
        path = os.path.join(ROOT + PROGRAM_DIR, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, 0o444)
    os.chmod(ROOT + PROGRAM_DIR, 0o555)
    os.makedirs(ROOT + WORK_DIR)
    os.rmdir(ROOT + "/tmp")
    os.symlink(WORK_DIR, ROOT + "/tmp")  # programs that use /tmp write into their own folder
    return userns


def finish_jail() -> None:
    """As PID 1 of the new PID namespace: a fresh /proc, then the switch to the new root."""
    jail.mount("proc", ROOT + "/proc", "proc", jail.MS_NOSUID | jail.MS_NODEV | jail.MS_NOEXEC)
    jail.pivot(ROOT)
    jail.remount_root_readonly()


def fresh_workdir(spec: dict, uid: int | None, confined: bool) -> str:
    if not confined:
        return spec["host_workdir"]
    try:
        jail.umount(WORK_DIR)
    except OSError:
        pass  # the first test: nothing mounted yet
    jail.mount("tmpfs", WORK_DIR, "tmpfs", jail.MS_NOSUID | jail.MS_NODEV,
               f"size={int(spec['disk_mb'])}m,mode=0700,nr_inodes=4096")
    if uid is not None and not spec["userns"] and os.getuid() == 0:
        os.chown(WORK_DIR, uid, uid)
    return WORK_DIR


def _limits(lim: dict) -> None:
    def set_(res: int, value: int) -> None:
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            pass  # a limit above the hard one the runner holds: keep the stricter inherited one

    set_(resource.RLIMIT_CPU, int(lim["cpu_time_s"]))
    set_(resource.RLIMIT_AS, int(lim["memory_mb"]) << 20)
    set_(resource.RLIMIT_FSIZE, int(lim["max_file_bytes"]))
    # 64 descriptors also bound the kernel objects that are descriptors (pipes and sockets at their default
    # buffer sizes, eventfd, epoll, signalfd, timerfd; the filter refuses growing the buffers), and the
    # descriptors a process may have in flight over unix sockets
    set_(resource.RLIMIT_NOFILE, 64)
    set_(resource.RLIMIT_CORE, 0)
    set_(resource.RLIMIT_NPROC, int(lim["nproc"]))
    # Kernel memory that the address space and the resident budget do not show (issue 29): no locked
    # pages, no POSIX message queue bytes, and few queued signals. These count per uid (for an unprivileged
    # trainer, up to the trainer's own uid), so a program could otherwise use up the trainer's share.
    set_(resource.RLIMIT_MEMLOCK, 0)
    set_(resource.RLIMIT_MSGQUEUE, 0)
    set_(resource.RLIMIT_SIGPENDING, 128)


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if data:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_fd(fd: int, limit: int) -> tuple[str, bool]:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks, n = [], 0
    while n <= limit:
        b = os.read(fd, min(1 << 20, limit + 1 - n))
        if not b:
            break
        chunks.append(b)
        n += len(b)
    data = b"".join(chunks)
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


def _exec_test(spec: dict, argv: list[str], fds: tuple[int, int, int, int], workdir: str,
               uid: int | None) -> None:  # in the test child; never returns
    try:
        os.setpgid(0, 0)
        for src, dst in zip(fds, (0, 1, 2, 3)):
            os.dup2(src, dst, inheritable=True)
        os.closerange(4, 1 << 16)
        os.chdir(workdir)
        if spec["confined"]:
            # PID 1 is not dumpable (so programs cannot open its /proc files); a non-dumpable child could
            # not write its own uid_map, and execve resets the flag anyway
            jail.prctl(jail.PR_SET_DUMPABLE, 1)
            jail.become_unprivileged(uid, spec["userns"])
        elif os.getuid() == 0 and uid is not None:
            jail.become_unprivileged(uid, False)
        _limits(spec["limits"])
        try:
            jail.install_seccomp(jail.DENY_ALWAYS)
        except OSError:
            if spec["confined"]:
                raise
        jail.prctl(jail.PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
        os.execve(argv[0], argv, spec["env"])
    except BaseException as e:  # noqa: BLE001  reported through the test's stderr
        os.write(2, f"sandbox could not start the program: {e}\n".encode())
    finally:
        os._exit(127)


def _namespace_usage() -> tuple[int, int]:
    """(processes, resident bytes) of every process in this PID namespace but PID 1."""
    n, rss = 0, 0
    page = os.sysconf("SC_PAGE_SIZE")
    for name in os.listdir("/proc"):
        if name.isdigit() and name != "1":
            try:
                with open(f"/proc/{name}/statm") as f:
                    rss += int(f.read().split()[1]) * page
                n += 1
            except (OSError, ValueError, IndexError):
                pass
    return n, rss


def _wait(pid: int, timeout: float, budget: dict | None) -> tuple[int | None, str]:
    """Wait for `pid`; (wait status, "") or (None, why) on time out or a broken budget."""
    deadline = time.monotonic() + timeout
    fd = os.pidfd_open(pid)
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status, ""
            left = deadline - time.monotonic()
            if left <= 0:
                return None, "timeout"
            select.select([fd], [], [], min(left, POLL_S) if budget else left)
            if budget:
                n, rss = _namespace_usage()
                if n > budget["processes"]:
                    return None, "process_limit"
                if rss > budget["memory_bytes"]:
                    return None, "memory_limit"
    finally:
        os.close(fd)


def _kill_leftovers(pid: int, pid1: bool, uid: int | None = None) -> list[int]:
    """As PID 1 of the namespace, kill(-1) reaches exactly the sandbox; otherwise the test's group, and,
    when the runner is root, every process of the sandbox uid (a daemon that left the group with setsid
    would otherwise outlive the test and meet the next one, issue 29). Returns the processes that outran the
    clean-up (`_kill_descendants`)."""
    try:
        if pid1:
            os.kill(-1, signal.SIGKILL)
        else:
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if not pid1 and uid is not None and os.getuid() == 0:
        jail.kill_uid(uid)
    survivors = _kill_descendants() if not pid1 else []
    while True:  # reap everything re-parented to us
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break
    return survivors


CLEANUP_S = 3.0  # how long an unconfined runner chases the orphans of a test


def _kill_descendants() -> list[int]:
    """Unconfined runs: the runner is a child subreaper (`_unconfined`), so whatever a program left (a
    daemon that double-forked and called setsid, beyond the reach of its process group and, when the
    trainer is not root, of any uid) is re-parented to the runner once its parent dies. Kill the runner's
    children until none is left: each round's orphans are the next round's children. Returns the children
    still there after CLEANUP_S seconds.

    No guarantee (issue 29 review): unconfined and not root, a chain of processes that each fork and exit at
    once can stay ahead of this loop (the one live process is always a new one); only a PID namespace (the
    confined sandbox) or a uid of its own (a root trainer) contains that. The run then reports the survivors
    and the program scores 0."""
    deadline = time.monotonic() + CLEANUP_S
    while True:
        kids = _children()
        if not kids or time.monotonic() > deadline:
            return kids
        for k in kids:  # our unreaped children: their pids cannot be reused before we wait for them
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for k in kids:
            try:
                os.waitpid(k, 0)
            except ChildProcessError:
                pass


def _children() -> list[int]:
    """The runner's children: /proc/self/task/*/children where the kernel has it (cheap), else a scan."""
    me, out, found = os.getpid(), [], False
    try:
        for t in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{t}/children") as f:
                    out += [int(x) for x in f.read().split()]
                found = True
            except FileNotFoundError:
                break
    except OSError:
        pass
    if found:
        return out
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and _parent_of(n) == me]


def _parent_of(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def run_test(spec: dict, test: dict, timeout: float, uid: int | None, out_left: int) -> dict:
    """One test; `out_left`: bytes of output the run may still return. Stdout and the harness's result
    each keep at most the per-test limit, together at most `out_left`."""
    lim, confined = spec["limits"], spec["confined"]
    workdir = fresh_workdir(spec, uid, confined)
    fds = (_memfd("stdin", test["stdin"].encode()), _memfd("stdout"), _memfd("stderr"), _memfd("result"))
    argv = [spec["python"], "-I", "-B", os.path.join(spec["program_dir"], test["entry"])]
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _exec_test(spec, argv, fds, workdir, uid)
    budget = {"processes": int(lim["max_processes"]), "memory_bytes": int(lim["memory_mb"]) << 20} \
        if confined else None
    status, why = _wait(pid, timeout, budget)
    wall = time.monotonic() - t0
    if status is None:
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
    survivors = _kill_leftovers(pid, confined, uid)
    per_test = int(lim["max_output_bytes"])
    stdout, out_cut = _read_fd(fds[1], min(per_test, out_left))
    stderr, _ = _read_fd(fds[2], 4096)
    result, res_cut = _read_fd(fds[3], min(per_test, max(0, out_left - len(stdout.encode()))))
    out_cut = out_cut or res_cut
    for fd in fds:
        os.close(fd)
    res = {"wall_s": round(wall, 4), "stdout": stdout, "stderr": stderr[-2000:], "result": result}
    if why:
        res.update(status=why, returncode=None)
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        kind = {signal.SIGXCPU: "timeout", signal.SIGXFSZ: "file_size_limit"}.get(sig, "killed")
        res.update(status=kind, returncode=-sig)
    else:
        code = os.WEXITSTATUS(status)
        res.update(status="ok" if code == 0 else "runtime_error", returncode=code)
    if out_cut:
        res["status"] = "output_limit"
    if survivors:
        res["outran"] = len(survivors)
    return res


def run_all(spec: dict, notes: list[str]) -> None:
    uid = spec.get("uid")
    if spec["confined"]:
        os.chdir("/")
    jail.prctl(jail.PR_SET_DUMPABLE, 0)  # programs cannot open /proc/1/fd or /proc/1/mem of the runner
    deadline = time.monotonic() + spec["total_timeout_s"]
    out_left = int(spec["limits"]["max_run_output_bytes"])  # the run's output budget, over all tests
    results = []
    for test in spec["tests"]:
        left = deadline - time.monotonic()
        if left <= 0 or out_left <= 0:
            results.append({"status": "timeout" if left <= 0 else "output_limit", "returncode": None,
                            "stdout": "", "stderr": "", "result": "", "wall_s": 0.0, "skipped": True})
            continue
        res = run_test(spec, test, min(spec["per_test_timeout_s"], left), uid, out_left)
        # as the trainer receives it: JSON, where a control character takes six bytes
        out_left -= len(json.dumps(res["stdout"])) + len(json.dumps(res["result"]))
        results.append(res)
        if res.pop("outran", 0):  # they may tamper with later tests: the run is void, and scores 0
            notes.append(f"processes of test {len(results)} outran the clean-up")
            _emit({"error": f"the program's processes outran the clean-up (test {len(results)}: still forking "
                            f"after {CLEANUP_S:g} s; unconfined sandbox)", "notes": notes})
            return
    _emit({"results": results, "notes": notes})


def _unconfined(spec: dict, notes: list[str]) -> None:
    """Only with reward.sandbox.allow_unconfined: rlimits and a process group, in a host temp folder."""
    import shutil
    import tempfile

    wd = tempfile.mkdtemp(prefix="prorl-sbx-")
    try:
        for name, text in spec["files"].items():
            with open(os.path.join(wd, name), "w", encoding="utf-8") as f:
                f.write(text)
        uid = spec.get("uid")
        if os.getuid() == 0 and (uid is None or not jail.world_executable(spec["python"])):
            # never run a program as root: that is no sandbox at all
            _emit({"error": f"unconfined sandbox as root: {spec['python']} is not reachable by an unprivileged "
                            "uid (every folder on its path must be searchable by others)"})
            return
        if os.getuid() == 0:
            for p in [wd] + [os.path.join(wd, n) for n in os.listdir(wd)]:
                os.chown(p, uid, uid)
        spec.update(program_dir=wd, host_workdir=wd)
        notes.append("UNCONFINED: rlimits only (reward.sandbox.allow_unconfined)")
        try:  # orphans of the programs come to the runner, which kills them after each test
            jail.prctl(PR_SET_CHILD_SUBREAPER, 1)
        except OSError:
            pass
        run_all(spec, notes)
    finally:
        shutil.rmtree(wd, ignore_errors=True)


def main() -> None:
    spec = json.loads(sys.stdin.buffer.read())
    notes: list[str] = []
    spec["program_dir"] = PROGRAM_DIR
    if not spec["confined"]:
        _unconfined(spec, notes)
        return
    try:
        spec["userns"] = setup_jail(spec)
    except OSError as e:
        _emit({"error": f"sandbox setup failed: {e}"})
        sys.exit(3)
    child = os.fork()
    if child:  # outside the PID namespace: wait for its PID 1 and pass its exit status on
        _, status = os.waitpid(child, 0)
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 4)
    # Default dispositions: the kernel then drops every signal a program sends to its namespace's PID 1
    # (Python's SIGINT handler would otherwise turn one into a KeyboardInterrupt and end the run).
    for sig in (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    try:
        jail.prctl(jail.PR_SET_PDEATHSIG, signal.SIGKILL)
        finish_jail()
    except OSError as e:
        _emit({"error": f"sandbox setup failed: {e}"})
        os._exit(3)
    notes.append("confined: allowlist root, " + ("user namespace" if spec["userns"] else "root namespaces"))
    run_all(spec, notes)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
