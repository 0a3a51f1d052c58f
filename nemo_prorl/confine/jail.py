"""Confinement primitives for untrusted code: an allowlist root file system, an unprivileged identity and a
seccomp filter. Standard library only: `runner.py` imports it in a process that must start fast
and must import nothing of the trainer; the verifier workers (workers.py) use it too.

Why each layer (issue 18, found by attacking the earlier sandbox):
- A blocklist of hidden folders leaves everything else of the host readable (training data, checkpoints,
  models). Here the program's root is a fresh tmpfs holding only read-only binds of the interpreter and
  the system libraries, its own folder, and a few device nodes; the host root is detached, so there is
  nothing underneath to unmount back into view.
- Root inside a user namespace has every capability there and could undo mounts. The program runs under
  an unprivileged uid (a uid of the trainer's own block when the trainer is root, else uid 65534 of a
  nested user namespace), with no_new_privs and a seccomp filter that refuses mount, namespace, ptrace,
  keyring, bpf and similar calls.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import struct

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
CLONE_NEWPID, CLONE_NEWIPC, CLONE_NEWUTS = 0x20000000, 0x08000000, 0x04000000
CLONE_NEWCGROUP, CLONE_NEWTIME, CLONE_THREAD = 0x02000000, 0x00000080, 0x00010000
NEW_NAMESPACES = CLONE_NEWNS | CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS \
    | CLONE_NEWCGROUP | CLONE_NEWTIME
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 4, 38, 22
SECCOMP_MODE_FILTER = 2
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
EPERM, ENOSYS = 1, 38

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# Per-architecture syscall numbers (from the kernel's unistd tables): what the filters refuse.
_ARCH = {
    "x86_64": (0xC000003E, {
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "keyctl": 250, "add_key": 248,
        "request_key": 249, "bpf": 321, "perf_event_open": 298, "kexec_load": 246, "kexec_file_load": 320,
        "init_module": 175, "finit_module": 313, "delete_module": 176, "open_by_handle_at": 304,
        "name_to_handle_at": 303, "userfaultfd": 323, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "move_mount": 429, "open_tree": 428, "mount_setattr": 442, "syslog": 103,
        "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171,
        "iopl": 172, "ioperm": 173, "acct": 163, "quotactl": 179, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "pidfd_getfd": 438, "lookup_dcookie": 212,
        "clone": 56, "clone3": 435, "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "kill": 62,
        "tkill": 200, "tgkill": 234, "pidfd_send_signal": 424, "pidfd_open": 434,
        "shmget": 29, "msgget": 68, "mq_open": 240, "memfd_create": 319, "memfd_secret": 447, "kcmp": 312,
        "process_madvise": 440, "process_mrelease": 448, "migrate_pages": 256, "move_pages": 279,
        "prlimit64": 302, "setpriority": 141, "ioprio_set": 251, "sched_setaffinity": 203,
        "sched_setscheduler": 144, "sched_setparam": 142, "sched_setattr": 314, "socket": 41, "socketpair": 53,
        "semget": 64, "semop": 65, "semctl": 66, "semtimedop": 220, "msgsnd": 69, "msgrcv": 70, "msgctl": 71,
        "shmat": 30, "shmctl": 31, "shmdt": 67, "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243,
        "mq_notify": 244, "mq_getsetattr": 245, "io_setup": 206, "io_destroy": 207, "io_getevents": 208,
        "io_submit": 209, "io_cancel": 210, "io_pgetevents": 333, "timer_create": 222, "inotify_init": 253,
        "inotify_init1": 294, "inotify_add_watch": 254, "fanotify_init": 300, "fanotify_mark": 301,
        "fcntl": 72, "setsockopt": 54, "landlock_create_ruleset": 444, "landlock_add_rule": 445,
        "landlock_restrict_self": 446, "vmsplice": 278, "splice": 275, "tee": 276,
    }),
    "aarch64": (0xC00000B7, {
        "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268,
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "keyctl": 219, "add_key": 217,
        "request_key": 218, "bpf": 280, "perf_event_open": 241, "kexec_load": 104, "kexec_file_load": 294,
        "init_module": 105, "finit_module": 273, "delete_module": 106, "open_by_handle_at": 265,
        "name_to_handle_at": 264, "userfaultfd": 282, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "move_mount": 429, "open_tree": 428, "mount_setattr": 442, "syslog": 116,
        "swapon": 224, "swapoff": 225, "reboot": 142, "sethostname": 161, "setdomainname": 162,
        "acct": 89, "quotactl": 60, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "pidfd_getfd": 438, "lookup_dcookie": 18, "clone": 220, "clone3": 435, "execve": 221,
        "execveat": 281, "kill": 129, "tkill": 130, "tgkill": 131, "pidfd_send_signal": 424,
        "pidfd_open": 434, "shmget": 194, "msgget": 186, "mq_open": 180, "memfd_create": 279,
        "memfd_secret": 447, "kcmp": 272, "process_madvise": 440, "process_mrelease": 448, "migrate_pages": 238,
        "move_pages": 239, "prlimit64": 261, "setpriority": 140, "ioprio_set": 30, "sched_setaffinity": 122,
        "sched_setscheduler": 119, "sched_setparam": 118, "sched_setattr": 274, "socket": 198, "socketpair": 199,
        "semget": 190, "semop": 193, "semctl": 191, "semtimedop": 192, "msgsnd": 189, "msgrcv": 188,
        "msgctl": 187, "shmat": 196, "shmctl": 195, "shmdt": 197, "mq_unlink": 181, "mq_timedsend": 182,
        "mq_timedreceive": 183, "mq_notify": 184, "mq_getsetattr": 185, "io_setup": 0, "io_destroy": 1,
        "io_getevents": 4, "io_submit": 2, "io_cancel": 3, "io_pgetevents": 292, "timer_create": 107,
        "inotify_init1": 26, "inotify_add_watch": 27, "fanotify_init": 262, "fanotify_mark": 263,
        "fcntl": 25, "setsockopt": 208, "landlock_create_ruleset": 444, "landlock_add_rule": 445,
        "landlock_restrict_self": 446, "vmsplice": 75, "splice": 76, "tee": 77,
        # (aarch64 has no inotify_init: inotify_init1 only)
    }),
}
# Refused for every confined process: changing mounts or namespaces, looking into other processes,
# kernel keyrings, loading code into the kernel, io_uring (a history of escapes), host-wide settings.
DENY_ALWAYS = ("mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "ptrace", "process_vm_readv",
               "process_vm_writev", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
               "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
               "open_by_handle_at", "name_to_handle_at", "userfaultfd", "fsopen", "fsconfig", "fsmount",
               "fspick", "move_mount", "open_tree", "mount_setattr", "syslog", "swapon", "swapoff", "reboot",
               "sethostname", "setdomainname", "iopl", "ioperm", "acct", "quotactl", "io_uring_setup",
               "io_uring_enter", "io_uring_register", "pidfd_getfd", "lookup_dcookie",
               # memory outside any process (the runner's budget counts processes' resident memory):
               # SysV shared memory and message queues, POSIX queues, memfds (the runner makes the test's
               # own memfds before the filter)
               "shmget", "msgget", "mq_open", "memfd_create", "memfd_secret",
               # reaching into another process of the same uid (the runner, when the trainer is not root)
               "kcmp", "process_madvise", "process_mrelease", "migrate_pages", "move_pages",
               # kernel objects that neither RLIMIT_AS nor the runner's resident-memory budget sees, and that
               # no rlimit bounds (issue 29): a program held 1.4 GiB of SysV semaphore sets beyond its budget,
               # and reserved the host's every AIO event (aio-max-nr is host-wide), so the host's own io_setup
               # failed. POSIX timers and inotify instances count against per-uid quotas that, when the trainer
               # is not root, are the trainer's own (its timers and file watches would fail). Every IPC call
               # too, not only the *get: nothing to reach if a creation slipped through. Landlock rules: one
               # per port or inode, unlimited (64 bytes each: 4 MiB in each ruleset descriptor).
               "semget", "semop", "semctl", "semtimedop", "msgsnd", "msgrcv", "msgctl", "shmat", "shmctl",
               "shmdt", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr",
               "io_setup", "io_destroy", "io_getevents", "io_submit", "io_cancel", "io_pgetevents",
               "timer_create", "inotify_init", "inotify_init1", "inotify_add_watch", "fanotify_init",
               "fanotify_mark", "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
               # Page references outside every budget (issue 29 review): vmsplice puts references to the
               # caller's own pages in a pipe, and a slot holding one byte of a transparent huge page keeps
               # the whole 2 MiB page alive after the program unmaps it (32 MiB per 16-slot pipe; a test
               # program held 1.8 GiB this way with 14 MiB resident). splice and tee move such references
               # on: a slot, or a socket's fragment (charged by its length, not its page), pins a whole page
               # or page-cache folio for one byte (here a unix socket with a 208 KiB send buffer took 4352
               # one-byte splices, one page of a deleted tmpfs file each: ~17 MiB). Python programs do not
               # need them (the standard library never calls os.splice); sendfile stays (shutil,
               # socket.sendfile): one call is one fragment of at most one page-cache folio, bounded by the
               # socket's buffer per call overhead.
               "vmsplice", "splice", "tee")
# Calls whose target is in their arguments: allowed on the caller itself only, as (argument index, allowed
# values) conditions that must all hold. When the trainer is not root the runner (PID 1) has the
# program's kernel uid, and prlimit on it could starve the runner of memory or files for the next tests;
# setpriority and ioprio_set also take a user (PRIO_USER, IOPRIO_WHO_USER): only the calling process.
PRIO_PROCESS, IOPRIO_WHO_PROCESS = 0, 1
SELF_ONLY = {"prlimit64": ((0, (0,)),), "setpriority": ((0, (PRIO_PROCESS,)), (1, (0,))),
             "ioprio_set": ((0, (IOPRIO_WHO_PROCESS,)), (1, (0,))), "sched_setaffinity": ((0, (0,)),),
             "sched_setscheduler": ((0, (0,)),), "sched_setparam": ((0, (0,)),), "sched_setattr": ((0, (0,)),)}
# Calls refused when all their (argument index, values) conditions hold. Descriptors (pipes, sockets,
# eventfd, epoll, signalfd, timerfd) are bounded by RLIMIT_NOFILE, but what some hold is not: a pipe grows
# to pipe-max-size (F_SETPIPE_SZ) and a socket's buffer to twice net.core.wmem_max (4 MiB on our test
# host, where 20 forked processes buffered 1.6 GiB in socket pairs), neither in anyone's resident memory. At their
# default sizes (64 KiB, net.core.wmem_default) descriptors x processes stays small. POSIX record locks
# (F_SETLK: a kernel object per locked range, no limit at all) are refused too; flock() (one per open
# file) stays. Both arches share these values (asm-generic fcntl.h and socket.h).
F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW, F_SETPIPE_SZ = 6, 7, 37, 38, 1031
SOL_SOCKET, SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE = 1, 7, 8, 32, 33
REFUSED_ARGS = {"fcntl": ((1, (F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW, F_SETPIPE_SZ)),),
                "setsockopt": ((1, (SOL_SOCKET,)), (2, (SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE)))}
# Socket families: unix and internet sockets only (the network namespace is empty). Netlink reads host
# events (uevents) and vsock reaches the hypervisor: neither is confined by a network namespace.
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SOCKET_FAMILIES = (AF_UNIX, AF_INET, AF_INET6)
EAFNOSUPPORT = 97
# A verifier scoring an answer needs no processes and no signals: it cannot start, exec or signal any
# (it shares the trainer's uid when the trainer is not root, so kill() would otherwise reach the trainer).
DENY_VERIFIER = ("fork", "vfork", "execve", "execveat", "kill", "tkill", "tgkill", "pidfd_send_signal",
                 "pidfd_open")


class JailError(OSError):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise JailError(err, f"{what}: {os.strerror(err)}")


def mount(src: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {target}")


def umount(target: str) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def map_self(inside_uid: int, outside_uid: int, outside_gid: int) -> None:
    """After unshare(CLONE_NEWUSER): map our own ids (the only mapping an unprivileged process may write)."""
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{inside_uid} {outside_uid} 1")
    _write("/proc/self/gid_map", f"{inside_uid} {outside_gid} 1")


def enter_namespaces(extra: int) -> bool:
    """A new mount namespace (+ `extra` flags), inside a new user namespace unless we are real root, and
    all mounts private. Returns whether a user namespace was created. JailError where the kernel refuses."""
    uid, gid = os.getuid(), os.getgid()
    userns = uid != 0
    unshare(CLONE_NEWNS | extra | (CLONE_NEWUSER if userns else 0))
    if userns:
        map_self(0, uid, gid)  # root of the new namespace: needed to mount; dropped before untrusted code
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    return userns


def _locked_flags(src: str) -> int:
    """Mount flags of `src` that a bind remount inside a user namespace must keep (the kernel refuses to
    clear nosuid/nodev/noexec/atime flags a more privileged namespace set)."""
    f = os.statvfs(src).f_flag
    out = 0
    for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                   (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):
        if f & st:
            out |= ms
    return out


def bind(src: str, dst: str, *, readonly: bool = True, nodev: bool = True, flags_of: str | None = None) -> None:
    """Bind `src` (a folder or file; may be /proc/self/fd/N of an O_PATH descriptor) at `dst` (created),
    read-only by default. Not recursive: mounts below `src` stay hidden."""
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            open(dst, "w").close()
    mount(src, dst, None, MS_BIND)
    if readonly:
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | (MS_NODEV if nodev else 0) \
            | _locked_flags(flags_of or src)
        mount("none", dst, None, flags)


def allowlist_paths(python: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Host paths bound read-only into a jail that runs `python`: the system's programs and libraries,
    the interpreter's installation (which may live outside /usr, e.g. pyenv under a private home) and
    `extra`. Symlinked top-level folders (/lib -> usr/lib) become symlinks in the jail."""
    real = os.path.realpath(python)
    prefix = os.path.dirname(os.path.dirname(real))  # .../bin/python3 -> the installation
    cands = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache", "/etc/localtime", prefix,
             *extra]
    out: list[str] = []
    for c in cands:
        if c and os.path.lexists(c) and c != "/" and c not in out:
            out.append(c)
    return out


DEVICES = ("null", "zero", "full", "random", "urandom")


def build_root(root: str, ro_paths: list[str], *, size_mb: int = 1) -> None:
    """Mount a tmpfs at `root` and fill it: read-only binds of `ro_paths` at the same paths, /dev with
    a few harmless device nodes, empty /proc and /tmp mount points. Sources are opened before the tmpfs
    covers `root`, so a source below `root` stays reachable."""
    sources = []
    for p in ro_paths + [f"/dev/{d}" for d in DEVICES]:
        if os.path.islink(p) and os.path.dirname(p) == "/":  # /lib -> usr/lib: a symlink, as on the host
            sources.append((p, None, os.readlink(p)))
        elif os.path.exists(p):
            sources.append((p, os.open(os.path.realpath(p), os.O_PATH), None))
    try:
        mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={max(size_mb, 1)}m,mode=0755")
        os.makedirs(root + "/dev", exist_ok=True)
        mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
        for p, fd, link in sources:
            if fd is None:
                os.symlink(link, root + p)
            elif p.startswith("/dev/"):
                bind(f"/proc/self/fd/{fd}", root + p, readonly=False, nodev=False)
            else:
                bind(f"/proc/self/fd/{fd}", root + p)
    finally:
        for _, fd, _ in sources:
            if fd is not None:
                os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    # read-only: no files in /dev for one test to leave to the next (the device binds stay usable)
    mount("tmpfs", root + "/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for d in ("proc", "tmp"):
        os.makedirs(f"{root}/{d}", exist_ok=True)


def pivot(root: str) -> None:
    """Make `root` the root file system and detach the host's: nothing of it stays reachable."""
    nr = {"x86_64": 155, "aarch64": 41}.get(platform.machine())
    if nr is None:
        raise JailError(ENOSYS, f"pivot_root: unsupported architecture {platform.machine()}")
    os.chdir(root)
    _check(_libc.syscall(nr, b".", b"."), "pivot_root")  # stack the old root under the new one
    umount(".")  # ... and detach it
    os.chdir("/")


def remount_root_readonly() -> None:
    mount("none", "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def seccomp_filter(deny: tuple[str, ...], *, threads_only: bool) -> bytes:
    """A classic-BPF seccomp program: another architecture is killed (its numbers differ), x32 calls and
    the `deny` calls fail with EPERM, clone3 with ENOSYS (so libc falls back to clone, whose flags a
    filter can read), the argument rules hold (SELF_ONLY, socket families, REFUSED_ARGS), and clone
    creating namespaces fails - or, with `threads_only`, any clone that is not a thread."""
    machine = platform.machine()
    if machine not in _ARCH:
        raise JailError(ENOSYS, f"seccomp: unsupported architecture {machine}")
    arch, nrs = _ARCH[machine]

    def ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    ld, jeq, jge, jset, ja, ret = 0x20, 0x15, 0x35, 0x45, 0x05, 0x06
    prog = [ins(ld, 4), ins(jeq, arch, 1, 0), ins(ret, RET_KILL_PROCESS), ins(ld, 0)]
    if machine == "x86_64":  # the x32 ABI numbers (bit 30) would bypass a table of x86_64 numbers
        prog += [ins(jge, 0x40000000, 0, 1), ins(ret, RET_ERRNO | EPERM)]
    prog += [ins(jeq, nrs["clone3"], 0, 1), ins(ret, RET_ERRNO | ENOSYS)]
    for name in deny:
        if name in nrs:
            prog += [ins(jeq, nrs[name], 0, 1), ins(ret, RET_ERRNO | EPERM)]
    # argument conditions: [nr?] then per condition [load arg] [== v: next condition ...] [jump: second];
    # [first] [second]: all conditions hold -> first. Allow-rules (SELF_ONLY, socket families) have first =
    # allow, second = refuse; REFUSED_ARGS the other way round. The accumulator holds the number again for
    # the next rule only when it did not match.
    allow = ins(ret, RET_ALLOW)
    rules = [(nrs[n], conds, (allow, ins(ret, RET_ERRNO | EPERM))) for n, conds in SELF_ONLY.items()] + \
        [(nrs[n], ((0, SOCKET_FAMILIES),), (allow, ins(ret, RET_ERRNO | EAFNOSUPPORT)))
         for n in ("socket", "socketpair")] + \
        [(nrs[n], conds, (ins(ret, RET_ERRNO | EPERM), allow)) for n, conds in REFUSED_ARGS.items()]
    for nr, conds, (first, second) in rules:
        body: list[bytes] = []
        for i, (arg, allowed) in enumerate(conds):
            k = len(allowed)
            body.append(ins(ld, 16 + 8 * arg))
            # a match skips the rest of this condition's compares and its jump to the second return
            body += [ins(jeq, v, k - j, 0) for j, v in enumerate(allowed)]
            left = sum(1 + len(a) + 1 for _, a in conds[i + 1:])  # the later conditions' instructions
            body.append(ins(ja, left + 1))  # past them and the first return: to the second
        body += [first, second]
        prog += [ins(jeq, nr, 0, len(body))] + body
    # last: clone's flags (args[0], low 32 bits at offset 16 on little-endian machines)
    prog += [ins(jeq, nrs["clone"], 0, 2), ins(ld, 16)]
    if threads_only:
        prog += [ins(jset, CLONE_THREAD, 0, 1)]
    else:
        prog += [ins(jset, NEW_NAMESPACES, 1, 0)]
    prog += [ins(ret, RET_ALLOW), ins(ret, RET_ERRNO | EPERM)]
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp(deny: tuple[str, ...], *, threads_only: bool = False) -> None:
    """no_new_privs, then the filter; both are inherited by every child and survive execve."""
    prog = seccomp_filter(deny, threads_only=threads_only)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    _check(_libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), 0, 0),
           "seccomp")


def world_executable(path: str) -> bool:
    """Whether another uid could run `path`: every folder on the way must be searchable by others."""
    p = os.path.realpath(path)
    while p != "/":
        if not os.stat(p).st_mode & 0o001:
            return False
        p = os.path.dirname(p)
    return True


def become_unprivileged(uid: int | None, userns: bool) -> str:
    """Drop to an identity without privileges before running untrusted code. Real root: setresuid to
    `uid` (capabilities go with it). Root of a user namespace (an unprivileged trainer): a nested user
    namespace where we are uid 65534, so execve keeps no capability and the mounts made above stay locked.
    Returns a note for the run's record."""
    if not userns and os.getuid() == 0:
        if uid is None:
            raise JailError(EPERM, "running as root needs a sandbox uid")
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        return f"uid {uid}"
    if userns:
        unshare(CLONE_NEWUSER)
        map_self(65534, 0, 0)
        return "uid 65534 in a nested user namespace"
    return f"uid {os.getuid()} (not root: no other uid to drop to)"


def kill_uid(uid: int, within: range | None = None) -> None:
    """kill(-1, SIGKILL) from a forked child running as `uid` (real, effective and saved): the kernel signals
    every process of that uid in one pass under its task list lock, so no fork slips between a scan and a
    kill, and no reused pid of another uid is hit. Refused (nothing is signalled) for uid 0, for a uid
    outside `within` and for a `within` holding 0: kill(-1) as root would kill everything."""
    child = os.fork()
    if child == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            # the last check before a call that, as root or another uid, would kill what is not ours
            ours = within is None or (uid in within and 0 not in within)
            if os.getresuid() == (uid, uid, uid) and uid != 0 and ours:
                os.kill(-1, signal.SIGKILL)
        except BaseException:  # noqa: BLE001  nothing of the caller may run on in this child
            pass
        os._exit(0)
    os.waitpid(child, 0)
