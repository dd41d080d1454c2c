"""User-facing errors and the CLI wrapper that turns them into one line and an exit code.

Exit status (docs/reference/commands.md): 0 on success, 2 for a user error (bad argument, path, file or configuration)
with one line on stderr, 75 when the study's storage stayed unreachable past the grace period
(run the command again later), 130 after Ctrl-C, 1 for anything else.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator


class UserError(Exception):
    """A problem the user can fix: bad path, bad file, bad configuration, refused submission."""


class StorageFull(UserError):
    """A write failed for want of space (a full disk, a quota, a file-size limit); the file's
    previous version is kept, and retrying can help once space is freed."""


class RankLost(UserError):
    """A process of a data-parallel run died (killed, out of memory). The run folder keeps its
    last epoch checkpoint: ``--resume`` continues, and a search retries the trial."""


class StorageUnreachable(Exception):
    """The study's storage could not be reached for longer than the grace period; nothing was
    lost, and the same command continues the study once the storage is back."""


STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_storage_full(exc: BaseException) -> bool:
    return isinstance(exc, StorageFull) or (isinstance(exc, OSError) and exc.errno in STORAGE_FULL_ERRNOS)


@contextlib.contextmanager
def storage_full_is_one_line(path: Path) -> Iterator[None]:
    """Turn a write that failed for want of space into ``StorageFull`` naming ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in STORAGE_FULL_ERRNOS:
            raise
        raise StorageFull(f"cannot write {path}: {exc.strerror or exc}; its previous version is kept") from None


EXIT_OK, EXIT_FAILURE, EXIT_USER_ERROR = 0, 1, 2
EXIT_STORAGE_UNREACHABLE = 75  # EX_TEMPFAIL: try again later


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def cli_main(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a command's ``main(argv)``: UserError -> one line on stderr and exit status 2;
    Ctrl-C -> exit 130 with a short line; any other exception keeps its traceback (exit 1).
    SIGTERM (what a scheduler or ``kill`` sends before SIGKILL) is handled as Ctrl-C: running
    work stops cleanly and resumes on the next run."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        # (where SIGTERM is ignored, as a supervisor may arrange, it stays ignored)
        handle_term = (threading.current_thread() is threading.main_thread()
                       and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN)
        previous = signal.signal(signal.SIGTERM, _interrupt) if handle_term else None
        try:
            return main(argv) or EXIT_OK
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        except StorageUnreachable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_STORAGE_UNREACHABLE
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            if handle_term:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def configure_logging() -> None:
    """clipse's own messages (warnings, skipped-data counts, chosen splits) at INFO on stderr;
    other libraries' chatter only from WARNING up."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("clipse").setLevel(logging.INFO)
