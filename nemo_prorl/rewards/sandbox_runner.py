"""The process that runs untrusted programs, started by `LocalSandbox` as `python -I -B sandbox_runner.py
SPEC.json`. Standard library only: it must start fast and import nothing of the trainer.

Containment, in order (each layer is skipped with a note in the result where the kernel refuses it):
1. Namespaces (Linux): a new user namespace unless already root, plus new mount, network, IPC and PID
   namespaces. The network namespace is empty, so connect() fails. In the mount namespace the trainer's
   home, working and project directories are covered by empty tmpfs mounts, with only the interpreter's
   prefix bound back read-only. The runner forks once more so its child is PID 1 of the new PID
   namespace, with a fresh /proc: the trainer's processes (and their /proc/*/environ) are invisible,
   `kill(-1)` reaches only the sandbox, and when PID 1 exits the kernel kills every process left in the
   namespace, so sleeping children and fork bombs cannot outlive a test.
2. A real root runner drops to an unprivileged uid, so RLIMIT_NPROC applies and nothing of root is readable.
3. Per test: a child with rlimits (CPU time, address space, file size, open files, processes, no core)
   execs a fresh interpreter with a scrubbed environment, stdin from a file, stdout/stderr to files in the
   fresh work directory. Wall time is enforced per test and in total; after each test every process left
   in the namespace is killed.
The runner prints one JSON line: {"results": [...], "notes": [...]} or {"error": "..."}.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
CLONE_NEWPID, CLONE_NEWIPC = 0x20000000, 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {target}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def unshare_network() -> None:
    """Enter an empty network namespace (inside a new user namespace unless root); OSError if refused."""
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(CLONE_NEWNET | (CLONE_NEWUSER if uid != 0 else 0)), "unshare")
    if uid != 0:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")  # keep our own uid: files stay ours
        _write("/proc/self/gid_map", f"{gid} {gid} 1")


def enter_namespaces(spec: dict, notes: list[str]) -> None:
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    if uid != 0:
        flags |= CLONE_NEWUSER
    _check(_libc.unshare(flags), "unshare")
    if uid != 0:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    # read-only binds of the interpreter, and the work dir (writable) bound back into the hidden dirs
    keep = [(p, True) for p in spec["keep"] if os.path.isdir(p)] + [(spec["workdir"], False)]
    for hide in spec["hide"]:
        inside = [(k, ro) for k, ro in keep if k == hide or k.startswith(hide.rstrip("/") + "/")]
        fds = [os.open(k, os.O_PATH | os.O_DIRECTORY) for k, _ in inside]
        _mount("tmpfs", hide, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        for (k, ro), fd in zip(inside, fds):
            os.makedirs(k, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", k, None, MS_BIND | MS_REC)
            if ro:
                _mount("none", k, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
            os.close(fd)
        notes.append(f"hidden {hide}")


def _world_executable(path: str) -> bool:
    """Whether another uid could run `path`: every directory on the way must be searchable by others."""
    p = os.path.realpath(path)
    while p != "/":
        if not os.stat(p).st_mode & 0o001:
            return False
        p = os.path.dirname(p)
    return True


def drop_privileges(spec: dict, notes: list[str]) -> None:
    if os.getuid() == 0 and not spec["namespaces"] and not _world_executable(spec["python"]):
        notes.append("running as root: the interpreter is not reachable by an unprivileged uid")
    elif os.getuid() == 0 and spec.get("uid") is not None and not spec.get("in_userns"):
        uid = int(spec["uid"])
        os.chown(spec["workdir"], uid, uid)
        for name in os.listdir(spec["workdir"]):
            os.chown(os.path.join(spec["workdir"], name), uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        notes.append(f"uid {uid}")
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid: a credential change clears it
    _libc.prctl(PR_SET_DUMPABLE, 0)  # tests cannot open /proc/1/fd of this runner


def _limits(lim: dict) -> None:
    def set_(res: int, value: int) -> None:
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            pass  # a limit above the hard one the runner holds: keep the stricter inherited one

    set_(resource.RLIMIT_CPU, int(lim["cpu_time_s"]))
    set_(resource.RLIMIT_AS, int(lim["memory_mb"]) << 20)
    set_(resource.RLIMIT_FSIZE, int(lim["max_file_bytes"]))
    set_(resource.RLIMIT_NOFILE, 64)
    set_(resource.RLIMIT_CORE, 0)
    set_(resource.RLIMIT_NPROC, int(lim["nproc"]))


def _kill_leftovers(pid: int, pid1: bool) -> None:
    """Kill every process the test left behind: as PID 1 of the namespace, kill(-1) reaches exactly the
    sandbox; otherwise the test's process group."""
    try:
        if pid1:
            os.kill(-1, signal.SIGKILL)
        else:
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    while True:  # reap everything re-parented to us
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break


def _wait(pid: int, timeout: float) -> int | None:
    """Wait for `pid` up to `timeout` seconds; its wait status, or None on time out."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if fd is not None:
                select.select([fd], [], [], left)
            else:
                time.sleep(min(left, 0.002))
    finally:
        if fd is not None:
            os.close(fd)


def _read(path: str, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


def run_test(spec: dict, i: int, timeout: float, pid1: bool) -> dict:
    wd, lim = spec["workdir"], spec["limits"]
    inp, out, err = (os.path.join(wd, f".{k}{i}") for k in ("in", "out", "err"))
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the test process
        try:
            os.setpgid(0, 0)
            fd_in = os.open(inp, os.O_RDONLY)
            fd_out = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            fd_err = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            for src, dst in ((fd_in, 0), (fd_out, 1), (fd_err, 2)):
                os.dup2(src, dst)
            os.closerange(3, 1 << 16)
            _limits(lim)
            os.execve(spec["python"], [spec["python"], "-I", "-B", spec["program"]], spec["env"])
        except BaseException as e:  # noqa: BLE001  reported through the test's stderr
            os.write(2, f"sandbox could not start the program: {e}\n".encode())
        finally:
            os._exit(127)
    status = _wait(pid, timeout)
    wall = time.monotonic() - t0
    timed_out = status is None
    if timed_out:
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
    _kill_leftovers(pid, pid1)
    stdout, out_cut = _read(out, lim["max_output_bytes"])
    stderr, _ = _read(err, 4096)
    res = {"wall_s": round(wall, 4), "stdout": stdout, "stderr": stderr[-2000:]}
    if timed_out:
        res.update(status="timeout", returncode=None)
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        kind = {signal.SIGXCPU: "timeout", signal.SIGXFSZ: "file_size_limit"}.get(sig, "killed")
        res.update(status=kind, returncode=-sig)
    else:
        code = os.WEXITSTATUS(status)
        res.update(status="ok" if code == 0 else "runtime_error", returncode=code)
    if out_cut:
        res["status"] = "output_limit"
    for p in (out, err):
        os.unlink(p)
    return res


def run_all(spec: dict, notes: list[str], pid1: bool) -> None:
    if pid1:
        try:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError as e:
            notes.append(f"no fresh /proc: {e}")
    drop_privileges(spec, notes)
    os.chdir(spec["workdir"])
    deadline = time.monotonic() + spec["total_timeout_s"]
    results = []
    for i in range(spec["num_tests"]):
        left = deadline - time.monotonic()
        if left <= 0:
            results.append({"status": "timeout", "returncode": None, "stdout": "", "stderr": "",
                            "wall_s": 0.0, "skipped": True})
            continue
        results.append(run_test(spec, i, min(spec["per_test_timeout_s"], left), pid1))
    sys.stdout.write(json.dumps({"results": results, "notes": notes}) + "\n")
    sys.stdout.flush()


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    notes: list[str] = []
    if spec["namespaces"]:
        try:
            enter_namespaces(spec, notes)
        except OSError as e:
            sys.stdout.write(json.dumps({"error": f"sandbox setup failed: {e}"}) + "\n")
            sys.exit(3)
        spec["in_userns"] = os.getuid() == 0 and os.path.exists("/proc/self/uid_map") and \
            open("/proc/self/uid_map").read().split()[1:2] != ["0"]
        child = os.fork()
        if child:  # outside the PID namespace: wait for its PID 1 and pass its exit status on
            _, status = os.waitpid(child, 0)
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 4)
        run_all(spec, notes, pid1=True)
        os._exit(0)
    run_all(spec, notes, pid1=False)


if __name__ == "__main__":
    main()
