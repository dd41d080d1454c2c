"""The registry's lock where flock is missing or unreliable: detection and the lock-file fallback."""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import time
from pathlib import Path

import pandas as pd
import pytest

from clipse.runs.registry import REGISTRY_COLUMNS, append_row
from clipse.util import locks
from clipse.util.errors import UserError

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /home rw,relatime shared:2 - nfs4 server:/home rw,vers=4.2
41 40 0:36 / /home/scratch rw,relatime shared:3 - lustre 10.0.0.1@o2ib:/scratch rw,localflock
42 22 0:37 / /mnt/my\\040data rw - fuse.glusterfs gluster:/vol rw
"""


@pytest.mark.parametrize("path,kind", [("/", "ext4"), ("/tmp/x", "ext4"), ("/home", "nfs4"), ("/home/a/b", "nfs4"),
                                       ("/home/scratch/run", "lustre"), ("/homeless", "ext4"),
                                       ("/mnt/my data/x", "fuse.glusterfs")])
def test_filesystem_type_is_the_longest_mount_above(path, kind):
    assert locks.filesystem_type(Path(path), MOUNTINFO) == kind


def test_network_filesystems_get_the_lock_file(monkeypatch):
    monkeypatch.delenv("CLIPSE_LOCK", raising=False)
    monkeypatch.setattr(locks, "filesystem_type", lambda folder: {"/n": "nfs4", "/g": "fuse.glusterfs"}.get(str(folder), "ext4"))
    assert [locks.lock_kind(Path(p)) for p in ("/n", "/g", "/local")] == ["lockfile", "lockfile", "flock"]
    monkeypatch.setenv("CLIPSE_LOCK", "flock")
    assert locks.lock_kind(Path("/n")) == "flock"
    monkeypatch.setenv("CLIPSE_LOCK", "fcntl")
    with pytest.raises(UserError, match="CLIPSE_LOCK=fcntl"):
        locks.lock_kind(Path("/n"))


def _append_rows(path: str, worker: int, kind: str, refuse_flock: bool) -> None:
    import os

    os.environ["CLIPSE_LOCK"] = kind
    if refuse_flock:
        def refused(*args):
            raise OSError(errno.ENOLCK, "No locks available")
        fcntl.flock = refused
    for i in range(20):
        append_row(Path(path), {"run_id": f"w{worker}-{i}", "status": "completed"})


@pytest.mark.parametrize("kind,refuse_flock", [("lockfile", False), ("flock", True)])
def test_concurrent_appends_with_the_lock_file(tmp_path, kind, refuse_flock):
    """Chosen (CLIPSE_LOCK=lockfile) or forced by a refused flock: four processes, no row lost or torn."""
    path = tmp_path / "registry.csv"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_rows, args=(str(path), w, kind, refuse_flock)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    table = pd.read_csv(path)
    assert list(table.columns) == REGISTRY_COLUMNS and len(table) == 80 and table["run_id"].is_unique
    assert not Path(f"{path}.lock").exists()


def _append_one(path: str) -> None:
    append_row(Path(path), {"run_id": "late"})


@pytest.mark.parametrize("kind,refuse_flock", [("lockfile", False), ("flock", True)])
def test_the_lock_file_excludes_and_a_dead_holders_lock_goes_stale(tmp_path, monkeypatch, kind, refuse_flock):
    path = tmp_path / "registry.csv"
    monkeypatch.setenv("CLIPSE_LOCK", kind)
    if refuse_flock:
        def refused(*args):
            raise OSError(errno.ENOLCK, "No locks available")
        monkeypatch.setattr(fcntl, "flock", refused)
    context = multiprocessing.get_context("fork")
    with locks.exclusive_lock(path):
        waiting = context.Process(target=_append_one, args=(str(path),))
        waiting.start()
        waiting.join(timeout=2)
        assert waiting.is_alive() and "late" not in (path.read_text() if path.exists() else "")  # it waits
    waiting.join(timeout=30)
    assert waiting.exitcode == 0 and "late" in path.read_text()

    # a holder killed while holding the lock leaves <path>.lock behind: broken once stale
    monkeypatch.setattr(locks, "STALE_LOCK_S", 3)
    Path(f"{path}.lock").touch()
    started = time.monotonic()
    append_row(path, {"run_id": "after-stale"})
    assert 3 <= time.monotonic() - started < 20 and "after-stale" in path.read_text()


def _wait_for_lock(path: str) -> None:
    with locks.exclusive_lock(Path(path)):
        pass


def test_an_interrupted_waiter_leaves_the_holders_lock_file(tmp_path, monkeypatch):
    """Ctrl-C to a process waiting for the lock file must not remove the file its holder made,
    which would let a third process in beside the holder."""
    import os
    import signal

    path = tmp_path / "ask.lock"
    monkeypatch.setenv("CLIPSE_LOCK", "lockfile")
    with locks.exclusive_lock(path):
        held = Path(f"{path}.lock").read_bytes()
        waiter = multiprocessing.get_context("fork").Process(target=_wait_for_lock, args=(str(path),))
        waiter.start()
        time.sleep(1)
        os.kill(waiter.pid, signal.SIGINT)
        waiter.join(30)
        assert waiter.exitcode not in (0, None)  # interrupted while waiting
        assert Path(f"{path}.lock").read_bytes() == held
    assert not Path(f"{path}.lock").exists()


def test_a_holder_whose_lock_was_broken_leaves_the_new_holders_file(tmp_path, monkeypatch):
    path = tmp_path / "ask.lock"
    monkeypatch.setenv("CLIPSE_LOCK", "lockfile")
    with locks.exclusive_lock(path):
        Path(f"{path}.lock").write_bytes(b"another holder, after breaking this one's lock as stale")
    assert Path(f"{path}.lock").read_bytes().startswith(b"another holder")
