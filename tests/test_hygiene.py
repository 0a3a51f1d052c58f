"""What the suite leaves in the temp dir: the `pymp-*` folders of multiprocessing workers the tests kill are
found (tests/conftest.py removes those that appeared during the session, at its end)."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
from pathlib import Path

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
