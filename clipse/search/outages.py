"""A study's storage that rides out short outages (docs/reference/failure-behaviour.md).

Every storage call of the search, its workers and the final report goes through
``OutageTolerantStorage``: a call that fails because the storage cannot be reached (a
PostgreSQL server restarting, stopped or failing over; a shared filesystem briefly unavailable
under a journal file) is retried with backoff until the storage answers again or ``grace_s``
seconds have passed since the outage began. The first failed attempt prints one line
(``storage ... unreachable (...), retrying for up to N s``) and the recovery another; past the
grace the call raises ``StorageUnreachable``, which every command ends with in one line and
exit status 75. Only the process showing the study's progress announces (``announce_outages``). Only connection errors are retried: an integrity error or any other failure
of the storage itself raises at once.

SQLAlchemy's ``pool_pre_ping`` (``clipse.search.study.open_storage``) replaces connections a
restarted server dropped before they are used; this covers what it cannot: a server that is down.
Training waits meanwhile (the epoch's report is a storage call), so epoch reports reach the
storage in order. A call whose transaction committed just before the connection broke would be
repeated; Optuna's calls are single transactions, so the case needs a break between the commit
and its acknowledgement. Most calls are idempotent (setting an attribute or a step's value
again); finishing a trial is not: ``set_trial_state_values`` and ``retry_lost_trial`` check
whether it landed.
"""

from __future__ import annotations

import errno
import logging
import sys
import threading
import time
from typing import Any, Callable, Sequence

from optuna.storages import BaseStorage
from optuna.trial import TrialState
from sqlalchemy import exc as sql

from clipse.util.errors import StorageUnreachable

STORAGE_GRACE_S = 600.0     # how long a storage may be unreachable before a command gives up
FIRST_WAIT_S = 0.5
LONGEST_WAIT_S = 15.0
PROBES_PER_GRACE = 10       # the wait between attempts is at most a tenth of the grace
TRANSIENT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
                              errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EIO, errno.ESTALE, errno.ENOENT,
                              errno.EAGAIN, errno.ENOLCK})


# Optuna's RDB storage logs "Caught an error from sqlalchemy ... Falling back to a slower alternative"
# with the failed SQL when a query meets a dropped connection; the retries here are what happens next.
logging.getLogger("optuna.storages._rdb.storage").setLevel(logging.ERROR)

_OUTAGES: dict[str, float] = {}   # storage name -> when its current outage began (this process)
_LAST_OUTAGE: dict[str, tuple[float, float]] = {}  # storage name -> (when its last outage ended, how long it lasted)
_OUTAGES_LOCK = threading.Lock()
_ANNOUNCING: list[bool] = []  # non-empty in the process that shows the study's progress


def announce_outages() -> None:
    """Make this process say when a storage becomes unreachable and reachable again: the
    commands' coordinator does, so the wait shows once; workers wait quietly (a worker that
    gives up still ends with its one line)."""
    if not _ANNOUNCING:
        _ANNOUNCING.append(True)


def _chain(error: BaseException) -> list[BaseException]:
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    return chain


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` says the storage could not be reached (then a retry may succeed): a
    database connection that failed or broke, or a filesystem call that failed the way a briefly
    unavailable shared filesystem fails. An integrity error never is."""
    chain = _chain(error)
    if any(isinstance(e, sql.IntegrityError) for e in chain):
        return False
    for e in chain:
        if isinstance(e, (sql.OperationalError, sql.DisconnectionError, sql.InterfaceError)) or (
                isinstance(e, sql.DBAPIError) and e.connection_invalidated):
            return True
        if isinstance(e, ConnectionError) or (isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS):
            return True
    return False


def cause_of(error: BaseException) -> str:
    """The innermost cause's first line (``connection refused`` rather than Optuna's wrapper)."""
    root = _chain(error)[-1]
    text = (str(root).strip().splitlines() or [""])[0]
    return f"{type(root).__name__}: {text[:160]}" if text else type(root).__name__


class OutageTolerantStorage(BaseStorage):
    """``inner`` with every call retried through outages shorter than ``grace_s`` (module doc).
    ``name`` names the storage in messages, never with its password."""

    def __init__(self, inner: BaseStorage, name: str, grace_s: float = STORAGE_GRACE_S):
        self.inner, self.name, self.grace_s = inner, name, grace_s

    def _call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return ride_out(lambda: getattr(self.inner, method)(*args, **kwargs), self.name, self.grace_s)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        """Completing or pruning a trial, retried: when the connection broke after the first
        attempt's commit, the retry finds the trial already in that state with those values, and
        that attempt counts as the one that landed (repeating it would fail as "already
        finished"). Only a trial's own worker completes or prunes it, so the state says who wrote
        it; a FAIL may come from a sweeper too (``clipse.search.study.retry_lost_trial`` checks
        that case), and whether a RUNNING trial is this worker's is never guessed."""
        retrying = False

        def finish() -> bool:
            nonlocal retrying
            if retrying and state in (TrialState.COMPLETE, TrialState.PRUNED):
                trial = self.inner.get_trial(trial_id)
                if trial.state == state and list(trial.values or []) == list(values or []):
                    return True
            retrying = True
            return self.inner.set_trial_state_values(trial_id, state, values)

        return ride_out(finish, self.name, self.grace_s)


def ride_out(call: Callable[[], Any], name: str, grace_s: float) -> Any:
    """``call()``, retried with backoff while it fails because the storage ``name`` cannot be
    reached, until ``grace_s`` seconds after the outage began (then ``StorageUnreachable``)."""
    wait = FIRST_WAIT_S
    while True:
        try:
            result = call()
        except Exception as error:
            if not is_transient(error):
                raise
            elapsed = time.monotonic() - _outage_began(name, cause_of(error), grace_s)
            if elapsed >= grace_s:
                raise StorageUnreachable(f"storage {name} unreachable for {elapsed:.0f} s ({cause_of(error)}); run "
                                         "the same command again once it is back (the study resumes where it "
                                         "stopped)") from None
            time.sleep(min(wait, grace_s - elapsed))
            # Probed often enough that a storage back for a while between two outages is seen to be
            # (any call of the process that succeeds ends the outage): only a storage unreachable at
            # every probe for the whole grace counts as down that long.
            wait = min(2 * wait, LONGEST_WAIT_S, grace_s / PROBES_PER_GRACE)
            continue
        _outage_ended(name)
        return result


def _announce(line: str) -> None:
    if _ANNOUNCING:
        print(line, file=sys.stderr, flush=True)


def _outage_began(name: str, cause: str, grace_s: float) -> float:
    """When this storage's outage began; the first call to find it unreachable announces it
    (once per process and outage, however many threads and storage objects wait)."""
    with _OUTAGES_LOCK:
        if name not in _OUTAGES:
            _OUTAGES[name] = time.monotonic()
            _announce(f"storage {name} unreachable ({cause}), retrying for up to {grace_s:.0f} s")
        return _OUTAGES[name]


def _outage_ended(name: str) -> None:
    if name in _OUTAGES:
        with _OUTAGES_LOCK:
            started = _OUTAGES.pop(name, None)
            if started is not None:
                _LAST_OUTAGE[name] = (time.monotonic(), time.monotonic() - started)
        if started is not None:
            _announce(f"storage {name} reachable again after {time.monotonic() - started:.0f} s")


def recent_outage_s(name: str, within_s: float) -> float:
    """How long the storage ``name`` was unreachable in an outage that ended less than
    ``within_s`` seconds ago (0 when none did): heartbeats could not be written meanwhile, so
    whoever judges them allows that much more."""
    ended, lasted = _LAST_OUTAGE.get(name, (float("-inf"), 0.0))
    return lasted if time.monotonic() - ended < within_s else 0.0


def _forwarding(method: str) -> Callable:
    def call(self, *args, **kwargs):
        return self._call(method, args, kwargs)

    call.__name__ = call.__qualname__ = method
    call.__doc__ = getattr(BaseStorage, method).__doc__
    return call


for _method in ("check_trial_is_updatable", "create_new_study", "create_new_trial", "delete_study", "get_all_studies",
                "get_all_trials", "get_best_trial", "get_n_trials", "get_study_directions", "get_study_id_from_name",
                "get_study_name_from_id", "get_study_system_attrs", "get_study_user_attrs", "get_trial",
                "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id", "get_trial_param",
                "get_trial_params", "get_trial_system_attrs", "get_trial_user_attrs", "remove_session",
                "set_study_system_attr", "set_study_user_attr", "set_trial_intermediate_value", "set_trial_param",
                "set_trial_system_attr", "set_trial_user_attr"):
    setattr(OutageTolerantStorage, _method, _forwarding(_method))
OutageTolerantStorage.__abstractmethods__ = frozenset()  # every abstract method forwards (set just above)
