"""The ranks other than 0 of a data-parallel run (``clipse.training.distributed``): they train
every configuration rank 0 sends, on their share of each batch, until it sends None.

``python -m clipse.training.helper`` is how rank 0 starts them on this machine; under torchrun
or in a SLURM job of several tasks they are started for it and call ``serve`` themselves.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import torch.distributed as dist

from clipse.config import TrainConfig
from clipse.training.distributed import (
    INIT_METHOD_ENV,
    PARENT_PID_ENV,
    Ranks,
    Session,
    ranks_from_environment,
)
from clipse.training.trainer import train_as_helper
from clipse.util.errors import configure_logging

log = logging.getLogger(__name__)


def serve(ranks: Ranks) -> None:
    """A helper rank: train every configuration rank 0 sends, until it sends None."""
    while True:
        mapping = ranks.broadcast(None)
        if mapping is None:
            return
        train_as_helper(TrainConfig.from_mapping(mapping, "rank 0"), ranks)


def _exit_with_rank0(parent: int) -> None:
    """A helper started here ends when rank 0's process does (its collectives may not notice)."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os._exit(1)


def main() -> int:
    """``python -m clipse.training.helper``: a helper rank that rank 0 started on this machine."""
    configure_logging()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 handles Ctrl-C and stops its helpers
    threading.Thread(target=_exit_with_rank0, args=(int(os.environ[PARENT_PID_ENV]),), daemon=True).start()
    ranks = ranks_from_environment()
    Session.join(ranks, os.environ[INIT_METHOD_ENV])
    try:
        serve(ranks)
    except Exception as exc:  # rank 0 met it too, or is gone: rank 0 reports the run's fate, in one line
        log.debug("rank %d of %d stops: %s", ranks.rank, ranks.world, str(exc).splitlines()[0] if str(exc) else
                  type(exc).__name__)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
