"""pipeline.locks: exclusive lock files, free again when their holder dies."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import locks

ROOT = Path(__file__).resolve().parent.parent


def test_a_held_lock_is_busy_for_another_descriptor_of_the_same_process(tmp_path):
    path = tmp_path / "locks" / "v1.lock"  # its folder is made
    fd = locks.acquire(path)
    assert fd is not None and locks.acquire(path, blocking=False) is None
    locks.release(fd)
    with locks.held(path):
        assert locks.acquire(path, blocking=False) is None
    again = locks.acquire(path, blocking=False)
    assert again is not None
    locks.release(again)


def test_a_killed_holder_frees_its_lock(tmp_path):
    path = tmp_path / "gpu0.lock"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pipeline import locks\n"
        f"locks.acquire({str(path)!r}); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout.readline().strip() == "held"
    assert locks.acquire(path, blocking=False) is None
    child.send_signal(signal.SIGKILL)
    child.wait()
    fd = locks.acquire(path, blocking=False)
    assert fd is not None
    locks.release(fd)


def test_a_lock_that_cannot_be_made_raises_the_os_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):  # a file where its folder should be
        locks.acquire(tmp_path / "file" / "a.lock", blocking=False)
