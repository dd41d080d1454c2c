"""The inline backend: each task runs in this process when it is submitted, one at a time."""

from __future__ import annotations

import os

from clipse.executors.base import DONE, RUNNING, Executor, register_backend
from clipse.util.errors import UserError


@register_backend
class InlineExecutor(Executor):
    name = "inline"

    @classmethod
    def from_options(cls, options, folder, job_name):
        if options.workers > 1:
            raise UserError("--executor inline runs one at a time; use --executor local for --workers > 1")
        return cls()

    def submit(self, tasks):
        for task in tasks:
            task.state, task.info = RUNNING, {"pid": os.getpid()}
            try:
                task.result, task.state = task.fn(*task.args), DONE
            except Exception as exc:  # KeyboardInterrupt propagates to the caller
                task.fail(exc)
