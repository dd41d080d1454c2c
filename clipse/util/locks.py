"""An exclusive lock between processes on any host that share a filesystem.

``flock`` is the lock of choice where it works: the kernel releases it when its holder dies. On
network filesystems it is missing or unreliable: NFS mounted with ``nolock`` and Lustre mounted
with ``localflock`` grant it per node only, so two nodes both "hold" it; other mounts refuse it
(``ENOLCK``, ``EOPNOTSUPP``). There clipse uses a lock file created with ``O_EXCL`` instead
(atomic on NFSv3 and later and on Lustre, as Optuna's journal lock relies on), which a holder that
died leaves behind until it has not changed for ``STALE_LOCK_S`` seconds.

Which one: ``CLIPSE_LOCK=flock|lockfile`` when set; otherwise the lock file on the network and
cluster filesystems listed in ``NETWORK_FILESYSTEMS`` (by the mount's type in
``/proc/self/mountinfo``), and ``flock`` elsewhere, falling back to the lock file whenever
``flock`` is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import platform
import time
import uuid
from pathlib import Path
from typing import Iterator

from clipse.util.errors import UserError

log = logging.getLogger(__name__)

NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph",
                                 "glusterfs", "9p", "afs", "pvfs2", "orangefs"})
FLOCK_REFUSED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
STALE_LOCK_S = 30
LONGEST_POLL_S = 0.1  # a waiter looks at the lock file again after 1 ms, then twice as long each time, up to this
LOCK_KINDS = ("flock", "lockfile")


def filesystem_type(path: Path, mountinfo: str | None = None) -> str:
    """The type of the filesystem holding ``path`` (the longest mount point above it)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return ""
    target = os.path.realpath(path)
    best, kind = "", ""
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = fields[4].replace("\\040", " ")
        fs_type = line.split(" - ", 1)[1].split()[0]
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, fs_type
    return kind


def lock_kind(folder: Path) -> str:
    chosen = os.environ.get("CLIPSE_LOCK", "").strip()
    if chosen:
        if chosen not in LOCK_KINDS:
            raise UserError(f"CLIPSE_LOCK={chosen}: expected one of {', '.join(LOCK_KINDS)}")
        return chosen
    fs_type = filesystem_type(folder).split(".")[-1]  # fuse.glusterfs -> glusterfs
    return "lockfile" if fs_type in NETWORK_FILESYSTEMS else "flock"


@contextlib.contextmanager
def _lock_file(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock``: created with ``O_EXCL`` and holding its holder's token. A file whose
    mtime has not changed for ``STALE_LOCK_S`` seconds is a dead holder's and is removed. Unlike
    Optuna's ``JournalFileOpenLock``, a waiter interrupted at any point (Ctrl-C) leaves the holder's
    file alone, and a holder removes the file only while it still holds its own token."""
    lock = f"{path}.lock"
    token = f"{platform.node()}:{os.getpid()}:{uuid.uuid4().hex}".encode()
    seen_mtime, seen_since, poll = None, time.monotonic(), 0.001
    while True:
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                mtime = os.stat(lock).st_mtime
            except FileNotFoundError:
                continue
            if mtime != seen_mtime:
                seen_mtime, seen_since = mtime, time.monotonic()
            elif time.monotonic() - seen_since > STALE_LOCK_S:
                log.warning("%s: unchanged for %d s, so its holder is taken to be dead; removing it", lock, STALE_LOCK_S)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                continue
            time.sleep(poll)
            poll = min(2 * poll, LONGEST_POLL_S)
    try:
        try:
            os.write(descriptor, token)
        finally:
            os.close(descriptor)
        yield
    finally:
        with contextlib.suppress(OSError):
            with open(lock, "rb") as handle:
                mine = handle.read() == token
            if mine:
                os.unlink(lock)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock over ``path`` while the block runs: ``flock`` on ``path`` itself
    (created empty if missing), or the lock file ``<path>.lock``. Every process sharing ``path``
    must use the same kind: on one filesystem the choice is the same unless ``CLIPSE_LOCK`` differs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if lock_kind(path.parent) == "lockfile":
        with _lock_file(path):
            yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in FLOCK_REFUSED:
                raise
            log.warning("%s: flock refused (%s); using a lock file instead", path.parent, exc.strerror)
            with _lock_file(path):
                yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
