"""Journal files that a crash cannot destroy: a crash mid-write loses at most the record being written.

An Optuna journal is one JSON record per line, appended under a lock. A writer killed mid-append
(SIGKILL, a node losing power, an NFS client giving up) can leave a last line without its
newline: a *torn tail*. Optuna skips it when reading, but the next append lands right after it,
gluing both into one corrupt line that no reader gets past; the study is then lost. clipse keeps
that from happening in two places:

- every append first takes the journal's lock and, when the file does not end with a newline,
  moves the torn tail aside to ``<journal>.torn-<time>`` and cuts it off (``HealingLock``);
- opening a journal (search, final, workers, reports) reads it whole: a torn tail is moved aside
  the same way, with one warning naming both files; a corrupt record in the middle refuses the
  study with one line saying where and how to recover, and the file is not written to.

``python -m clipse.journal check|repair STUDY`` (``clipse/journal.py``) does the same by hand. ``repair`` copies the
journal to ``<journal>.bak-<time>`` first, then keeps every readable record, recovers a record
glued behind a torn one, and drops what cannot be read (docs/reference/failure-behaviour.md).

The lock is Optuna's symlink lock, which works on NFS and Lustre where ``flock`` may not.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from clipse.util.errors import UserError

log = logging.getLogger(__name__)
RECORD_START = b'{"op_code"'  # how Optuna starts every record: where a glued record begins


@dataclass
class JournalCheck:
    path: Path
    records: int                   # complete, readable records
    torn_tail: int                 # bytes after the last newline (0: none)
    corrupt_line: int | None       # first complete line that is not a readable record (1-based)
    corrupt_offset: int | None     # its byte offset

    @property
    def sound(self) -> bool:
        return not self.torn_tail and self.corrupt_line is None

    def describe(self) -> str:
        if self.corrupt_line is not None:
            return (f"{self.path}: the record on line {self.corrupt_line} (byte {self.corrupt_offset}) is corrupt, so "
                    f"the study cannot be read; nothing was written to it. Recover with: python -m clipse.journal "
                    f"repair {self.path} (it keeps a copy of the file first)")
        if self.torn_tail:
            return (f"{self.path}: {self.records} records and a torn last record of {self.torn_tail} bytes "
                    "(a crash mid-write); it is moved aside when the study is next opened")
        return f"{self.path}: {self.records} records, sound"


def _readable(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False


def check_journal(path: Path) -> JournalCheck:
    data = path.read_bytes() if path.exists() else b""
    end = data.rfind(b"\n") + 1
    check = JournalCheck(path, 0, len(data) - end, None, None)
    offset = 0
    for number, line in enumerate(data[:end].splitlines(keepends=True), start=1):
        if _readable(line):
            check.records += 1
        elif check.corrupt_line is None:
            check.corrupt_line, check.corrupt_offset = number, offset
        offset += len(line)
    return check


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def cut_torn_tail(path: Path) -> Path | None:
    """Move a torn last record aside; the caller holds the journal's lock. Returns the file it
    went to, or None when the journal ends with a newline."""
    try:
        handle = open(path, "r+b")
    except FileNotFoundError:
        return None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return None
        handle.seek(size - 1)
        if handle.read(1) == b"\n":  # the usual case, read on every append: one byte
            return None
        handle.seek(0)
        data = handle.read(size)
        keep = data.rfind(b"\n") + 1
        torn = data[keep:]
        aside = path.with_name(f"{path.name}.torn-{_stamp()}-{os.getpid()}")
        aside.write_bytes(torn)
        if os.fstat(handle.fileno()).st_size != size:
            # someone wrote meanwhile (a writer that took over a lock it judged stale): cut nothing
            aside.unlink()
            return None
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    log.warning("%s: its last record was torn by a crash mid-write (%d bytes); moved to %s, every complete "
                "record is kept", path, len(torn), aside)
    return aside


class HealingLock(JournalFileSymlinkLock):
    """Optuna's symlink lock on the journal, which on acquiring also cuts a torn tail, so no
    record is ever appended behind one."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self._journal = Path(path)

    def acquire(self) -> bool:
        super().acquire()
        try:
            cut_torn_tail(self._journal)
        except BaseException:
            self.release()
            raise
        return True


def open_journal(path: Path) -> JournalFileBackend:
    """The journal backend clipse uses, after checking the file: a torn tail is cut (one
    warning), a corrupt record refuses the study (UserError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    check = check_journal(path)
    if check.corrupt_line is not None:  # read again under the lock: a write in progress can look corrupt
        plain_lock = JournalFileSymlinkLock(str(path))
        plain_lock.acquire()
        try:
            check = check_journal(path)
        finally:
            plain_lock.release()
    if check.corrupt_line is not None:
        raise UserError(check.describe())
    lock = HealingLock(path)
    if check.torn_tail:
        lock.acquire()  # cuts it, unless a writer finished its record meanwhile
        lock.release()
    return JournalFileBackend(str(path), lock_obj=lock)


@dataclass
class Repair:
    backup: Path
    kept: int
    recovered: int   # records found glued behind a torn one
    dropped: int     # lines that held no readable record
    torn_tail: int   # bytes of a torn last record moved aside


def _glued_record(line: bytes) -> bytes | None:
    """A readable record that starts inside ``line`` (written right after a torn one)."""
    start = line.find(RECORD_START, 1)
    while start != -1:
        if _readable(line[start:]):
            return line[start:]
        start = line.find(RECORD_START, start + 1)
    return None


CREATE_TRIAL = b'{"op_code":4,'  # Optuna numbers trials by how many of these came before


def _may_create_trial(line: bytes) -> bool:
    """Whether an unreadable line may have been a record that created a trial (its op code says
    so, or cannot be told)."""
    return line.startswith(CREATE_TRIAL) or not line.startswith(RECORD_START)


def repair_journal(path: Path, force: bool = False) -> Repair:
    """Copy the journal aside, then rewrite it with every readable record (see the module doc).
    Holds the journal's lock; run it while no search uses the study. A line that cannot be read
    and may have created a trial is dropped only with ``force``: dropping it would renumber
    every later trial. (A torn record before a glued one is safe to drop: nobody read it.)"""
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        kept: list[bytes] = []
        recovered = dropped = 0
        for number, line in enumerate(data[:end].splitlines(keepends=True), start=1):
            if _readable(line):
                kept.append(line)
            elif (glued := _glued_record(line)) is not None:
                kept.append(glued)
                recovered += 1
            elif force or not _may_create_trial(line):
                dropped += 1
            else:
                raise UserError(f"{path}: line {number} cannot be read and may have created a "
                                "trial; dropping it would renumber every later trial. Look at it, then repair "
                                "with --force to drop it anyway (nothing was changed)")
        backup = path.with_name(f"{path.name}.bak-{_stamp()}")
        shutil.copy2(path, backup)
        tmp = path.with_name(f"{path.name}.repair-tmp")
        with open(tmp, "wb") as handle:
            handle.writelines(kept)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        lock.release()
    return Repair(backup, len(kept) - recovered, recovered, dropped, len(data) - end)
