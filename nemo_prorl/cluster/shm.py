"""The names of a run's transfer-buffer files in shared memory (weight_sync/buffer.py TransferBuffer), and their removal
where their owner cannot remove them itself.

A buffer file is `prorl-weights-<run tag>-<creator pid>-<random>-<bytes>` in /dev/shm. The run tag is
derived from the run (its user and its `trainer.output_dir`), so that:
- the controller knows every buffer's name up to its random part: when it kills a group of actors after a
  failure (ActorGroup.abort), it removes the files of those actors' pids, on their nodes, by a task there;
- a later job of the same run (a requeue, a resume) removes, on each node where it creates a buffer, the
  files an earlier job of the run left (`remove_stale`: a creator that no longer lives).
Neither can touch another run's files (another tag), another user's (the uid is part of the tag, and the
owner of each file is checked), nor a buffer whose creator still lives (unless the controller killed it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Collection, Optional

log = logging.getLogger("nemo_prorl")

PREFIX = "prorl-weights"
TAG_ENV = "PRORL_SHM_TAG"  # the run tag, in every actor's environment (cluster.actors.start_group)


def shm_dir() -> Path:
    return Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())


def run_tag(output_dir: str) -> str:
    """The run's tag: its user and its output folder (resolved, so that every spelling of it agrees)."""
    where = os.path.realpath(os.path.expanduser(output_dir))
    return hashlib.sha256(f"{os.getuid()}\0{where}".encode()).hexdigest()[:16]


def run_prefix(output_dir: str) -> str:
    """What the names of the run's buffer files begin with."""
    return f"{PREFIX}-{run_tag(output_dir)}-"


def _parse(name: str, tag: str) -> Optional[int]:
    """The creator pid of a buffer file of run `tag`; None for any other name."""
    parts = name.split("-")
    if len(parts) != 6 or "-".join(parts[:2]) != PREFIX or parts[2] != tag or not parts[3].isdigit():
        return None
    return int(parts[3])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a zombie holds no mapping any more: as good as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _unlink_ours(path: Path) -> bool:
    """Remove `path` if it is a regular file of this user (never a link, never someone else's file)."""
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return False
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def remove_files(tag: str, pids: Optional[Collection[int]] = None, wait_s: float = 0.0) -> list[str]:
    """On this node: remove the buffer files of run `tag` created by `pids` (each once it has exited, or
    after `wait_s`: a killed process must not create one after the removal), or, with `pids` None, those
    whose creator no longer lives. Returns the names removed."""
    deadline = time.monotonic() + wait_s
    for pid in pids or ():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    removed = []
    for path in shm_dir().glob(f"{PREFIX}-{tag}-*"):
        pid = _parse(path.name, tag)
        if pid is None or (pid not in pids if pids is not None else _alive(pid)):
            continue
        if _unlink_ours(path):
            removed.append(path.name)
    return removed


_SWEPT: set[str] = set()


def remove_stale(tag: str) -> None:
    """Once per process and run: remove what an earlier job of the run left on this node (see module doc)."""
    if tag in _SWEPT:
        return
    _SWEPT.add(tag)
    removed = remove_files(tag)
    if removed:
        log.info("removed %d transfer buffer(s) an earlier job of this run left in %s: %s", len(removed), shm_dir(),
                 ", ".join(removed))


def remove_on_nodes(tag: str, pids_by_node: dict[str, list[int]], timeout_s: float = 60.0) -> list[str]:
    """The controller's side: `remove_files(tag, pids)` on each Ray node (by id) as a task pinned there, for
    the processes it killed; waits for each node at most `timeout_s` (a dead node has nothing to remove)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    task = ray.remote(num_cpus=0, max_retries=0)(remove_files)
    refs: list[Any] = []
    for node, pids in pids_by_node.items():
        if node in alive and pids:
            where = NodeAffinitySchedulingStrategy(node, soft=False)
            refs.append(task.options(scheduling_strategy=where).remote(tag, list(pids), 30.0))
    if not refs:
        return []
    done, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if late:
        log.warning("%d node(s) did not remove a failed group's transfer buffers within %gs", len(late), timeout_s)
    removed: list[str] = []
    for ref in done:
        try:
            removed += ray.get(ref)
        except Exception as e:  # noqa: BLE001  the node went away meanwhile: nothing left to remove there
            log.warning("removing transfer buffers failed on a node: %s", e)
    return removed
