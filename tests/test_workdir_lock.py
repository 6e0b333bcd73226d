"""One run per workdir: a second lock on a held workdir is refused naming the holder; a freed one is taken."""

import json
import os
import socket

import pytest

from alexnet_jax.errors import WorkdirBusy
from alexnet_jax.workdir_lock import WorkdirLock, describe_holder


def test_a_held_workdir_is_refused_naming_its_holder(tmp_path):
    first = WorkdirLock(tmp_path).acquire()  # flock: two open files conflict even in one process
    try:
        with pytest.raises(WorkdirBusy) as e:
            WorkdirLock(tmp_path).acquire()
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(e.value)
    finally:
        first.release()
    again = WorkdirLock(tmp_path).acquire()  # released cleanly: free, and no stale holder to report
    assert again.stale is None
    again.release()


def test_a_lock_left_by_a_dead_run_is_taken_over_with_its_name(tmp_path):
    dead = {"host": "elsewhere", "pid": 12345, "started": "yesterday"}
    (tmp_path / "LOCK").write_text(json.dumps(dead))  # written, but nobody holds the flock
    lock = WorkdirLock(tmp_path).acquire()
    try:
        assert lock.stale == dead
        assert describe_holder(lock.stale) == "pid 12345 on host elsewhere, started yesterday"
        assert describe_holder({}) == "a run that has not written its name yet"
    finally:
        lock.release()
