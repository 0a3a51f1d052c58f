"""Issue 29, items 1, 6 and 7: no process of a verifier worker or of a sandboxed program outlives its time
limit or its run, and the sandbox uids cannot be taken away by another local user.

1. A verifier worker killed on a time-out (an answer spinning in C big-int arithmetic, which never returns
   to the interpreter to see a signal) leaves no process behind: not in its PID namespace, not under its
   sandbox uid; as root and as an unprivileged trainer (uid 1000 through setpriv, system interpreter).
6. The uid lock folder sits where only root can create it; one planted by another user is refused at
   launch, naming the path.
7. Without namespaces (reward.sandbox.allow_unconfined), a daemon that a program starts (double fork +
   setsid) is killed with its run and cannot tamper with a later program under the same uid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from nemo_prorl.config.schema import SandboxConfig
from nemo_prorl.confine import sandbox as sandbox_mod
from nemo_prorl.confine.sandbox import LocalSandbox, UidBlock, _namespaces_available

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PY = "/usr/bin/python3"
SETPRIV = shutil.which("setpriv")
VENV_SITE = sorted((REPO / ".venv" / "lib").glob("python3*/site-packages"))
needs_ns = pytest.mark.skipif(not _namespaces_available(), reason="this kernel forbids namespaces")
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="about a trainer running as root")


def _where(_arg):  # in the confined worker
    import os

    return {"ns": os.readlink("/proc/self/ns/pid"), "uid": os.getuid()}


def _spin(_arg):  # in the confined worker: C big-int arithmetic, for minutes
    return len(str(9 ** 9 ** 9 ** 9))


def _status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _in_namespace(ns: str) -> list[int]:
    """Live processes of the PID namespace `ns` (as `readlink /proc/PID/ns/pid` names it)."""
    out = []
    for pid in _pids():
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") == ns and not _status(pid).get("State", "Z").startswith(("Z", "X")):
                out.append(pid)
        except OSError:
            pass
    return out


def _of_uid(uid: int) -> list[int]:
    """Live processes with `uid` as any of their real, effective, saved or file-system uids."""
    out = []
    for pid in _pids():
        st = _status(pid)
        if str(uid) in st.get("Uid", "").split() and not st.get("State", "Z").startswith(("Z", "X")):
            out.append(pid)
    return out


def _still_there(find, timeout: float = 30.0) -> list[int]:
    """Polls `find()` until it is empty (generously: a busy machine); what is left at the end."""
    deadline = time.monotonic() + timeout
    while True:
        left = find()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _describe(pids: list[int]) -> str:
    return "; ".join(f"pid {p}: {_status(p).get('Name')} uid {_status(p).get('Uid')}" for p in pids)


def _kill_all(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


@needs_ns
def test_a_timed_out_verifier_leaves_no_process_behind():
    """Before the fix (as root): the worker's answer process was PID 1 of its PID namespace, and its
    death signal was cleared by the uid change, so killing the pool's process left it computing."""
    from nemo_prorl.confine.workers import HardTimeoutPool

    pool = HardTimeoutPool(1, ro_paths=[str(Path(__file__).parent)])  # a confined worker imports this module
    ns = None
    try:
        where = pool.call(_where, None, timeout=120)
        assert where.status == "ok", where
        ns, uid = where.value["ns"], where.value["uid"]
        if ns == os.readlink("/proc/self/ns/pid"):
            pytest.skip("the worker could not be confined here")
        assert _in_namespace(ns), "the worker's namespace is not visible"
        out = pool.call(_spin, None, timeout=1.0)
        assert out.status == "timeout", out
        left = _still_there(lambda: _in_namespace(ns))
        assert not left, f"the timed-out worker goes on: {_describe(left)}"
        if os.getuid() == 0:
            assert not _still_there(lambda: _of_uid(uid)), f"processes of sandbox uid {uid} remain"
        again = pool.call(_where, None, timeout=120)  # the pool still answers, from a fresh worker
        assert again.status == "ok" and again.value["ns"] != ns, again
    finally:
        pool.close()
        if ns is not None:
            _kill_all(_in_namespace(ns))


_NONROOT_POOL = """
import json, sys
sys.path.insert(0, {repo!r})
from nemo_prorl.confine.workers import HardTimeoutPool
from tests.test_sandbox_procs import _spin, _where
pool = HardTimeoutPool(1, ro_paths=[{tests!r}, {site!r}])  # the test module imports pytest
print(json.dumps(pool.call(_where, None, timeout=120).__dict__), flush=True)
print(json.dumps(pool.call(_spin, None, timeout=1.0).__dict__), flush=True)
sys.stdin.readline()  # the test looks at /proc now
print(json.dumps(pool.call(_where, None, timeout=120).__dict__), flush=True)
pool.close()
"""


@needs_ns
@needs_root
@pytest.mark.skipif(SETPRIV is None or not os.path.exists(SYSTEM_PY) or not VENV_SITE,
                    reason="needs setpriv, /usr/bin/python3 and the venv's packages")
def test_a_timed_out_verifier_of_an_unprivileged_trainer_leaves_no_process_behind():
    """The same with a trainer that is not root (uid 1000, the user-namespace path; the system interpreter
    with the venv's packages, since the venv's own interpreter lives in /root)."""
    script = _NONROOT_POOL.format(repo=str(REPO), tests=str(Path(__file__).parent), site=str(VENV_SITE[0]))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(VENV_SITE[0]), "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([SETPRIV, "--reuid", "1000", "--regid", "1000", "--clear-groups", SYSTEM_PY, "-c", script],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd="/tmp", env=env)
    ns = None
    try:
        where = json.loads(proc.stdout.readline() or "null")
        assert where and where["status"] == "ok", (where, proc.stderr.read() if proc.poll() is not None else "")
        ns = where["value"]["ns"]
        assert _in_namespace(ns), "the worker's namespace is not visible"
        out = json.loads(proc.stdout.readline())
        assert out["status"] == "timeout", out
        left = _still_there(lambda: _in_namespace(ns))
        assert not left, f"the timed-out worker goes on: {_describe(left)}"
        proc.stdin.write("\n")
        proc.stdin.flush()
        again = json.loads(proc.stdout.readline())
        assert again["status"] == "ok" and again["value"]["ns"] != ns, again
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
        proc.communicate()
        if ns is not None:
            _kill_all(_in_namespace(ns))


# --- item 6: the uid lock folder ---------------------------------------------------------------------------

def test_the_default_uid_lock_folder_can_only_be_created_by_root():
    """Before the fix: /run/lock/prorl-sandbox-uids, in a folder every user may write (mode 1777): another
    user who made it first turned every code and math row into an error."""
    parent = Path(UidBlock.LOCK_DIR).parent
    for p in [parent, *parent.parents]:
        st = os.lstat(p)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022, \
            f"{p}: owner {st.st_uid}, mode {oct(st.st_mode)}: another user could create {UidBlock.LOCK_DIR}"


@pytest.fixture
def root_only_dir():
    base = Path(tempfile.mkdtemp(prefix="prorl-uids-test-", dir="/var/lib"))  # root's own, mode 0700
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@needs_root
def test_a_uid_lock_folder_planted_by_another_user_fails_the_launch(root_only_dir, monkeypatch):
    planted = root_only_dir / "uids"
    planted.mkdir(mode=0o700)
    os.chown(planted, 1000, 1000)
    block = UidBlock(lock_dir=str(planted))
    with pytest.raises(RuntimeError, match=re.escape(str(planted)) + ".*owned by uid 1000"):
        block.take()
    # at launch: building the code sandbox or a verifier pool fails with that error, not every row later
    monkeypatch.setattr(sandbox_mod, "UIDS", UidBlock(lock_dir=str(planted)))
    with pytest.raises(RuntimeError, match=re.escape(str(planted))):
        LocalSandbox(SandboxConfig())
    from nemo_prorl.confine.workers import HardTimeoutPool

    with pytest.raises(RuntimeError, match=re.escape(str(planted))):
        HardTimeoutPool(1)
    from nemo_prorl.config.schema import RewardConfig
    from nemo_prorl.rewards import RewardSuite

    with pytest.raises(RuntimeError, match=re.escape(str(planted))):  # the trainer's and eval's suite
        RewardSuite(RewardConfig())


@needs_root
def test_a_uid_lock_folder_in_a_folder_others_may_write_is_refused(root_only_dir):
    """A folder others may write is where they can plant the lock folder first (a sticky bit does not stop
    that): refused, naming it, even while nobody has."""
    open_dir = root_only_dir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o1777)
    with pytest.raises(RuntimeError, match=re.escape(str(open_dir)) + ".*writable by others"):
        UidBlock(lock_dir=str(open_dir / "uids")).take()
    link = root_only_dir / "link"
    link.symlink_to(open_dir)
    with pytest.raises(RuntimeError, match=re.escape(str(link)) + ".*symlink"):
        UidBlock(lock_dir=str(link / "uids")).take()
    good = UidBlock(lock_dir=str(root_only_dir / "uids"))
    assert good.take() >= UidBlock.BASE  # a root-only folder works


# --- item 7: daemons of unconfined programs -----------------------------------------------------------------

# Double fork + setsid: a daemon out of the program's process group, which waits, then kills every other
# process of its uid (the next program run under it) and writes over the files of its uid it can find.
_DAEMON = textwrap.dedent("""
    import os, sys, time
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            time.sleep(1.0)
            end = time.time() + 60
            while time.time() < end:
                for p in os.listdir("/proc"):
                    if p.isdigit() and int(p) != os.getpid():
                        try:
                            if os.stat("/proc/" + p).st_uid == os.getuid():
                                os.kill(int(p), 9)
                        except OSError:
                            pass
                time.sleep(0.02)
        os._exit(0)
    os.close(w)
    print(os.read(r, 32).decode())
""")


@needs_root
@pytest.mark.skipif(not os.path.exists(SYSTEM_PY), reason="needs /usr/bin/python3 (reachable by a sandbox uid)")
def test_an_unconfined_program_leaves_no_daemon_for_the_next_run_of_its_uid(monkeypatch):
    """Before the fix: the daemon survived its run (only the program's process group was killed) and
    killed the next program run under the same uid."""
    monkeypatch.setattr(sandbox_mod, "_namespaces_available", lambda: False)
    monkeypatch.setattr(sandbox_mod, "_warned_unconfined", False)
    sb = LocalSandbox(SandboxConfig(total_timeout_s=20.0, per_test_timeout_s=10.0, allow_unconfined=True,
                                    python=SYSTEM_PY))
    monkeypatch.setattr(sb, "namespaces", False)
    block = UidBlock()  # a block of this machine's uids (exclusive), with one uid left free: runs reuse it
    monkeypatch.setattr(sandbox_mod, "UIDS", block)
    taken = [block.take() for _ in range(UidBlock.SIZE - 1)]
    uid = block.take()
    block.give(uid)
    daemon = None
    try:
        run = sb.run(_DAEMON, [""])
        assert sb.uids_used == {uid} and run.tests and run.tests[0].status == "ok", run
        daemon = int(run.tests[0].stdout)
        left = _of_uid(uid)
        assert not left, f"the program's daemon outlived its run: {_describe(left)}"
        for i in range(3):  # later programs under the same uid are not disturbed
            nxt = sb.run("import time\ntime.sleep(1.5)\nprint(input()[::-1])", ["abc\n"])
            assert nxt.tests and (nxt.tests[0].status, nxt.tests[0].stdout) == ("ok", "cba\n"), (i, nxt)
        assert sb.uids_used == {uid}
    finally:
        _kill_all(_of_uid(uid) + ([daemon] if daemon else []))
        del taken


# A daemon that only sleeps (it shares uid 1000 with other processes of this machine: it must not harm them).
_SLEEPER = textwrap.dedent("""
    import os, time
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            time.sleep(300)
        os._exit(0)
    os.close(w)
    print(os.read(r, 32).decode())
""")


@needs_root
@pytest.mark.skipif(SETPRIV is None or not os.path.exists(SYSTEM_PY), reason="needs setpriv and /usr/bin/python3")
def test_an_unconfined_program_of_an_unprivileged_trainer_leaves_no_daemon(monkeypatch):
    """The runner as uid 1000 (no uid of its own to drop to, none to kill by): before the fix the daemon
    outlived the run. Now the runner is a child subreaper and kills the orphans of each test."""
    monkeypatch.setattr(sandbox_mod, "_namespaces_available", lambda: False)
    monkeypatch.setattr(sandbox_mod, "_warned_unconfined", False)
    sb = LocalSandbox(SandboxConfig(total_timeout_s=20.0, per_test_timeout_s=10.0, allow_unconfined=True,
                                    python=SYSTEM_PY))
    monkeypatch.setattr(sb, "namespaces", False)
    sb.runner_prefix = [SETPRIV, "--reuid", "1000", "--regid", "1000", "--clear-groups"]
    daemons: list[int] = []
    try:
        for _ in range(2):
            run = sb.run(_SLEEPER, [""])
            assert run.tests and run.tests[0].status == "ok", run
            daemons.append(int(run.tests[0].stdout))
            st = _status(daemons[-1])
            assert not st or st.get("State", "").startswith(("Z", "X")) or st.get("Uid", "").split()[0] != "1000", \
                f"the program's daemon outlived its run: {_describe(daemons[-1:])}"
    finally:
        _kill_all([d for d in daemons if _status(d).get("Uid", "").split()[:1] == ["1000"]])


@needs_root
@pytest.mark.skipif(SETPRIV is None, reason="needs setpriv")
def test_a_uid_given_back_with_processes_is_cleared_before_it_is_handed_out_again():
    block = UidBlock()
    uid = block.take()
    rest = [block.take() for _ in range(UidBlock.SIZE - 1)]  # `uid` is the only one to hand out next
    proc = subprocess.Popen([SETPRIV, "--reuid", str(uid), "--regid", str(uid), "--clear-groups", "sleep", "300"],
                            start_new_session=True)
    try:
        assert _still_there(lambda: [] if _of_uid(uid) else [0], 10) == []  # running under `uid`
        block.give(uid)
        assert not _of_uid(uid), f"uid {uid} was given back with {_describe(_of_uid(uid))}"
        assert block.take() == uid
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
        del rest


# --- review of items 1 and 7: the sandbox uid blocks, the uid clean-up, the unconfined clean-up ----------------

BIG_BASE = 3_000_000_000  # far from any uid this machine gives out: tests claim blocks of their own here


def _block_at(base: int) -> range:
    """The block a UidBlock of this process tries first (its index follows the pid)."""
    k = os.getpid() % UidBlock.BLOCKS
    return range(base + k * UidBlock.SIZE, base + (k + 1) * UidBlock.SIZE)


def _sleep_as(uid: int) -> subprocess.Popen:
    proc = subprocess.Popen([SETPRIV, "--reuid", str(uid), "--regid", str(uid), "--clear-groups", "sleep", "300"],
                            start_new_session=True)
    assert _still_there(lambda: [] if _of_uid(uid) else [0], 30) == [], f"sleep never ran under uid {uid}"
    return proc


@needs_root
def test_a_uid_block_that_overlaps_a_subordinate_id_range_is_not_claimed(root_only_dir):
    """Before the fix the blocks (200000-968000) overlapped /etc/subuid's default ranges, where other users'
    rootless containers run, and claiming a block killed every process in it."""
    first = _block_at(BIG_BASE)
    subuid, subgid = root_only_dir / "subuid", root_only_dir / "subgid"
    subuid.write_text(f"# comment\nalice:{first.start + 10}:65536\nbroken line\n")
    subgid.write_text("")
    block = UidBlock(lock_dir=str(root_only_dir / "uids"), base=BIG_BASE, subuid=str(subuid), subgid=str(subgid))
    uid = block.take()
    assert uid not in first and uid not in range(first.start + 10, first.start + 10 + 65536), uid
    subuid.write_text("")  # the same through /etc/subgid (programs run with gid == uid)
    subgid.write_text(f"bob:{first.start}:1\n")
    block = UidBlock(lock_dir=str(root_only_dir / "uids2"), base=BIG_BASE, subuid=str(subuid), subgid=str(subgid))
    assert block.take() not in first


def test_a_uid_block_with_a_passwd_or_group_entry_is_foreign(tmp_path):
    import grp
    import pwd

    some_user = pwd.getpwall()[-1].pw_uid
    some_group = grp.getgrall()[-1].gr_gid
    empty = tmp_path / "none"
    block = UidBlock(base=BIG_BASE, subuid=str(empty), subgid=str(empty))  # missing files read as empty
    assert block.foreign(range(some_user, some_user + 1)), some_user
    assert block.foreign(range(some_group, some_group + 1)), some_group
    assert not block.foreign(_block_at(BIG_BASE))


@needs_root
@pytest.mark.skipif(SETPRIV is None, reason="needs setpriv")
def test_a_uid_block_with_live_processes_is_left_alone(root_only_dir):
    """Before the fix `_claim` SIGKILLed whatever ran in a newly locked block (another user's container,
    or a crashed trainer's program): now such a block is skipped and its processes live on."""
    first = _block_at(BIG_BASE)
    empty = root_only_dir / "none"
    proc = _sleep_as(first.start + 5)
    try:
        block = UidBlock(lock_dir=str(root_only_dir / "uids"), base=BIG_BASE, subuid=str(empty), subgid=str(empty))
        uid = block.take()
        assert uid not in first, uid
        time.sleep(0.5)
        assert proc.poll() is None, f"the process in the skipped block was killed ({proc.returncode})"
    finally:
        proc.kill()
        proc.wait()


_ZOMBIE_LEADER = r"""
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None)
def spin():
    time.sleep(300)
threading.Thread(target=spin).start()
sys.stdout.write("ready\n"); sys.stdout.flush()
libc.syscall(60, 0)  # SYS_exit: only the main thread ends; the process lives on as a zombie leader
"""


@needs_root
@pytest.mark.skipif(SETPRIV is None or not os.path.exists(SYSTEM_PY), reason="needs setpriv and /usr/bin/python3")
def test_uid_clean_up_kills_a_process_whose_main_thread_exited(root_only_dir):
    """Before the fix `kill_uid_processes` skipped a process in state Z whose other threads still run
    (Threads: 2), and gave the uid back as empty."""
    empty = root_only_dir / "none"
    block = UidBlock(lock_dir=str(root_only_dir / "uids"), base=BIG_BASE, subuid=str(empty), subgid=str(empty))
    uid = block.take()
    proc = subprocess.Popen([SETPRIV, "--reuid", str(uid), "--regid", str(uid), "--clear-groups", SYSTEM_PY, "-c",
                             _ZOMBIE_LEADER], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        assert _still_there(lambda: [] if _status(proc.pid).get("State", "").startswith("Z") else [0], 30) == []
        assert _status(proc.pid).get("Threads") == "2", _status(proc.pid)
        block.give(uid)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


def test_kill_uid_processes_refuses_root_and_uids_outside_the_block():
    with pytest.raises(ValueError, match="uid 0"):
        sandbox_mod.kill_uid_processes({0}, within=range(0, 64))
    with pytest.raises(ValueError, match="outside"):
        sandbox_mod.kill_uid_processes({1000}, within=_block_at(BIG_BASE))


@needs_root
def test_a_killed_worker_reaped_behind_the_pools_back_spares_the_process_that_reuses_its_pid():
    """Before the fix `_kill_tree` signalled the worker by pid after checking its exit code; another pool
    thread starting a worker (multiprocessing reaps exited children then) could reap it in between, and the
    SIGSTOP and SIGKILL went to whatever process took the pid next. Here the pid is reused on purpose
    (ns_last_pid) by a process that is not ours."""
    import multiprocessing as mp

    from nemo_prorl.confine.workers import _Worker

    if not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("cannot choose the next pid here")
    w = _Worker(mp.get_context("spawn"), None, ())
    pid = w.proc.pid
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)  # reaped, as Process.start() in another thread would, unknown to w.proc
    impostor, helpers = None, []
    # a child of a helper (which stays, so that the impostor is neither our child nor an orphan)
    fork_at = ("import os, sys\nt = int(sys.argv[1])\nopen('/proc/sys/kernel/ns_last_pid', 'w').write(str(t - 1))\n"
               "p = os.fork()\nif p == 0:\n    os.execv('/bin/sleep', ['sleep', '300'])\nprint(p, flush=True)\n"
               "os.waitpid(p, 0)")
    try:
        for _ in range(50):  # another process of the machine may take the pid first: try again
            helpers.append(subprocess.Popen([sys.executable, "-c", fork_at, str(pid)], stdout=subprocess.PIPE,
                                            text=True))
            got = int(helpers[-1].stdout.readline())
            if got == pid:
                impostor = pid
                break
            _kill_all([got])
        if impostor is None:
            pytest.skip("could not start a process under the reaped pid")
        w.kill()
        time.sleep(0.2)
        state = _status(impostor).get("State", "gone")
        assert state.startswith("S"), f"the process that reused the worker's pid was signalled: {state}"
    finally:
        if impostor is not None:
            _kill_all([impostor])
        for h in helpers:
            h.kill()
            h.wait()


# A chain: each process forks and exits at once, so there is never a process that stays to be killed. It
# stops by itself after 20 s (the test must not leave it behind, and cannot kill uid 1000 as a whole).
_CHAIN = textwrap.dedent("""
    import os, time
    end = time.time() + 20
    print("started", flush=True)
    if os.fork() == 0:
        os.setsid()
        while time.time() < end:
            if os.fork():
                os._exit(0)
    """)


def _chain_pids(marker: str) -> list[int]:
    out = []
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if marker.encode() in cmd and not _status(pid).get("State", "Z").startswith(("Z", "X")):
            out.append(pid)
    return out


@needs_root
@pytest.mark.skipif(SETPRIV is None or not os.path.exists(SYSTEM_PY), reason="needs setpriv and /usr/bin/python3")
def test_an_unconfined_fork_chain_is_killed_or_reported(monkeypatch):
    """Unconfined and not root: a chain of processes that fork and exit at once can stay ahead of the
    runner's clean-up. Before the fix the runner went on for 100000 rounds (a scan of /proc each) and the
    run came back clean; now the clean-up has a time limit, and a program whose processes outran it scores
    0 with that reason (no guarantee that it is killed: the runner's docstring says so)."""
    monkeypatch.setattr(sandbox_mod, "_namespaces_available", lambda: False)
    monkeypatch.setattr(sandbox_mod, "_warned_unconfined", False)
    sb = LocalSandbox(SandboxConfig(total_timeout_s=20.0, per_test_timeout_s=10.0, allow_unconfined=True,
                                    python=SYSTEM_PY))
    monkeypatch.setattr(sb, "namespaces", False)
    sb.runner_prefix = [SETPRIV, "--reuid", "1000", "--regid", "1000", "--clear-groups"]
    t0 = time.monotonic()
    run = sb.run(_CHAIN, [""])
    took = time.monotonic() - t0
    left = _chain_pids("solution.py")  # the chain runs the program's file: its command line names it
    if run.error:
        assert "outran" in run.error, run
    else:
        assert run.tests and run.tests[0].status == "ok", run
        assert not left, f"the chain outlived its run, unreported: {_describe(left)}"
    assert took < 60, f"the clean-up took {took:.0f} s"
    _still_there(lambda: _chain_pids("solution.py"), 40)  # it ends by itself
