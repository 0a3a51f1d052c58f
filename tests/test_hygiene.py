"""What the suite leaves in the temp dir: the `pymp-*` folders of multiprocessing workers the tests kill are
found (tests/conftest.py removes those that appeared during the session, at its end), and Megatron ranks make
no wandb folders. (vLLM's files: tests/test_vllm_engine.py; the trackers' wandb folders: tests/test_trackers.py.)"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import pymp_folders_left


def _make_temp_dir_and_hang(q) -> None:
    from multiprocessing import util

    q.put(util.get_temp_dir())
    signal.pause()


def test_a_killed_workers_pymp_folder_is_found():
    ctx = multiprocessing.get_context("spawn")  # a fresh process: its own pymp-* folder
    q = ctx.Queue()
    p = ctx.Process(target=_make_temp_dir_and_hang, args=(q,), daemon=True)
    p.start()
    folder = Path(q.get(timeout=120))
    os.kill(p.pid, signal.SIGKILL)  # never runs its finalizers: the folder stays
    p.join(30)
    try:
        assert folder.name.startswith("pymp-") and folder.is_dir()
        assert folder in pymp_folders_left()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_RANK_IMPORTS = ("import sys\nfrom nemo_prorl.policy.megatron_worker import MegatronRank\n{make}"
                 "from megatron.core import parallel_state, timers\nprint(timers.wandb is None, 'wandb' in sys.modules)")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_a_megatron_rank_goes_without_wandb():
    """megatron-core imports wandb when it is installed; every process that does makes two temp folders
    (wandb-media, wandb-artifacts), which a rank, stopped by a kill, left in /tmp. A rank's process blocks the
    import (its controller, which may run the W&B tracker, does not), and megatron-core still imports."""
    def run(make: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", _RANK_IMPORTS.format(make=make)], capture_output=True,
                             text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
        return out.stdout.split() or [out.stderr[-2000:]]

    assert run("") == ["False", "True"]  # the controller, which imports the class only: wandb comes along
    assert run("MegatronRank(None)\n") == ["True", "True"]  # a rank: the entry is there, and None
