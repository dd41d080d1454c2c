"""User-facing errors and the CLI wrapper that turns them into one line and an exit code.

Exit status (docs/commands.md): 0 on success, 2 for a user error (bad argument, path, file or configuration)
with one line on stderr, 1 for anything else.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix: bad path, bad file, bad configuration, refused submission."""


EXIT_OK, EXIT_FAILURE, EXIT_USER_ERROR = 0, 1, 2


def cli_main(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a command's ``main(argv)``: UserError -> one line on stderr and exit status 2;
    Ctrl-C -> exit 130 with a short line; any other exception keeps its traceback (exit 1)."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv) or EXIT_OK
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def configure_logging() -> None:
    """clipse's own messages (warnings, skipped-data counts, chosen splits) at INFO on stderr;
    other libraries' chatter only from WARNING up."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("clipse").setLevel(logging.INFO)
