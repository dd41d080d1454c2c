"""Fake tasks for the executor contract tests (a module, so worker processes can import it)."""

import os
import signal
import threading
import time

from clipse.executors import worker_environment
from clipse.util.errors import UserError


def identity(value):
    """Returns its argument and who ran it."""
    return value, worker_environment().identity()


def raises(message):
    raise ValueError(message)


def user_error(message):
    raise UserError(message)


def dies():
    os.kill(os.getpid(), signal.SIGKILL)


def sleeps(seconds, marker):
    """Writes ``marker`` when it starts, then sleeps."""
    with open(marker, "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(seconds)
    return "woke up"


def sleeps_then_raises(seconds, marker):
    sleeps(seconds, marker)
    raise ValueError("woke up to fail")


def returns_unpicklable():
    return threading.Lock()


def raises_unpicklable():
    raise ValueError("holds a lock", threading.Lock())
