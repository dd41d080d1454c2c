"""Data-parallel runs (``--nproc N``): one training run over N processes, one loss over the
global batch.

Rank 0 is the process that was asked to train (``clipse.train``, a search's trial task, a
report's run). It finds the other ranks already running (``torchrun``, or the N tasks of a SLURM
job, which export ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...) or starts them itself as
subprocesses on this machine (``python -m clipse.training.helper``). It sends them the run's
configuration; they train the same steps on their share of every batch and then wait for the
next configuration, or for the end. Rank 0 alone writes the run folder, talks to trackers and
Optuna and decides whether to stop (the decision is broadcast).

Each step, every rank encodes its share; the embeddings are gathered from all ranks with their
gradient and every rank computes the same loss on the whole batch. Gradients are then averaged
over the ranks (as DistributedDataParallel does, but after the backward pass, because a step
calls the two towers separately and micro-batching re-encodes chunks): the gathered embeddings
pass each rank's gradient back N times, the average divides by N, so the step equals one process
on the whole batch (tested to 1e-5).

A rank that dies (SIGKILL, out of memory) breaks the others' next collective: they end with an
error, the run folder keeps its last epoch checkpoint, and ``--resume`` continues from it.
Helpers started here also exit when rank 0's process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from clipse.util.errors import RankLost, UserError

log = logging.getLogger(__name__)

PARENT_PID_ENV = "CLIPSE_RANK0_PID"      # set for helpers this module starts: they end with rank 0
INIT_METHOD_ENV = "CLIPSE_INIT_METHOD"   # the rendezvous of helpers this module starts (a file)


@dataclass(frozen=True)
class Ranks:
    """This process's place in its run: rank, world size, rank on this node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shares(self, batch_size: int) -> list[int]:
        """How many pairs of a global batch each rank takes (in rank order; they differ by at most one)."""
        return [len(part) for part in np.array_split(np.arange(batch_size), self.world)]

    def my_rows(self, batch_size: int) -> slice:
        """This rank's consecutive share of a global batch: concatenated in rank order, the shares
        are the batch, so the gathered embeddings are in the batch's order."""
        sizes = self.shares(batch_size)
        start = sum(sizes[:self.rank])
        return slice(start, start + sizes[self.rank])

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda`` means this rank's GPU among those visible."""
        if device.type != "cuda" or self.world == 1:
            return device
        count = torch.cuda.device_count()
        index = self.local_rank if count > self.local_rank else 0  # all GPUs visible, or one per process
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

    # -- collectives (no-ops for one process) ---------------------------------------------------
    def gather(self, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's rows, in rank order, with gradient: the backward pass returns to each
        rank the sum over ranks of its rows' gradients."""
        if self.world == 1:
            return local
        padded = torch.nn.functional.pad(local, (0, 0, 0, max(sizes) - local.shape[0]))
        parts = _GatherWithGradient.apply(padded, self.rank, self.world)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @torch.no_grad()
    def gather_detached(self, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        if self.world == 1:
            return local
        padded = torch.nn.functional.pad(local, (0, 0, 0, max(sizes) - local.shape[0]))
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @torch.no_grad()
    def average_gradients(self, parameters) -> None:
        """Average every gradient over the ranks in one collective (the ranks' parameters get
        gradients in the same order, so the flat vectors line up)."""
        if self.world == 1:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (to stop, to save)."""
        return bool(self.broadcast(flag))

    def broadcast(self, value: Any) -> Any:
        """Rank 0's picklable ``value`` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_state(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (they agree already when seeded alike;
        this makes sure)."""
        if self.world == 1:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)


SINGLE_PROCESS = Ranks()


class _GatherWithGradient(torch.autograd.Function):
    """(world, *shape) stack of every rank's tensor; the gradient of this rank's tensor is the
    sum over ranks of the gradient each computed for it."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        ctx.rank = rank
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank], None, None


# ----------------------------------------------------------------------------------------------
# sessions: the process group a run's ranks share


def _backend() -> str:
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def ranks_from_environment() -> Ranks | None:
    """The ranks ``torchrun`` or a SLURM job's tasks describe in the environment (None: not there)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    return Ranks(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


class Session:
    """An initialised process group and, for rank 0, the helpers it started."""

    def __init__(self, ranks: Ranks, helpers: list[subprocess.Popen] | None = None):
        self.ranks = ranks
        self.helpers = helpers or []
        self.broken = False  # a run failed on rank 0: the helpers are left in a collective

    def break_off(self) -> None:
        """After rank 0 failed mid-run: end the group, so that the helpers' collectives fail too."""
        self.broken = True
        if dist.is_initialized():
            dist.destroy_process_group()

    @classmethod
    def join(cls, ranks: Ranks, init_method: str = "env://") -> "Session":
        dist.init_process_group(_backend(), init_method=init_method, rank=ranks.rank, world_size=ranks.world)
        return cls(ranks)

    def close(self, failed: bool) -> None:
        """Rank 0: tell the helpers the session is over (or, after an error, stop them)."""
        if self.ranks.main and not failed and not self.broken:
            with contextlib.suppress(RuntimeError):
                self.ranks.broadcast(None)
        for helper in self.helpers:  # ours to wait for; after an error, to stop
            if failed and helper.poll() is None:
                helper.terminate()
            try:
                helper.wait(timeout=30)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
        if dist.is_initialized():
            dist.destroy_process_group()


_session: Session | None = None


@contextlib.contextmanager
def session_from_environment() -> Iterator[Session | None]:
    """For a process that ``torchrun`` or a SLURM job started as one of N: the session of its
    ranks (rank 0 runs its work in it; the other ranks serve until it ends). None for one process."""
    global _session
    ranks = ranks_from_environment()
    if ranks is None:
        yield None
        return
    _session = Session.join(ranks)
    failed = True
    try:
        yield _session
        failed = False
    finally:
        _session.close(failed)
        _session = None


@contextlib.contextmanager
def run_ranks(nproc: int, cuda_wanted: bool = False) -> Iterator[Ranks]:
    """Rank 0's ranks for one run of ``nproc`` processes: the open session's, or helpers started
    now for this run alone (with ``cuda_wanted``, one GPU each)."""
    if nproc == 1:
        yield SINGLE_PROCESS
        return
    if _session is not None:
        if _session.ranks.world != nproc:
            raise UserError(f"--nproc {nproc}: this job runs {_session.ranks.world} processes")
        try:
            yield _session.ranks
        except BaseException as exc:
            _session.break_off()
            if isinstance(exc, dist.DistError):
                raise RankLost(f"a process of this {nproc}-process run failed: {str(exc).splitlines()[0]}; the "
                               "last epoch checkpoint is kept (--resume continues)") from exc
            raise
        return
    if cuda_wanted and torch.cuda.device_count() < nproc:
        raise UserError(f"--nproc {nproc} on CUDA needs {nproc} GPUs; {torch.cuda.device_count()} visible")
    threads = torch.get_num_threads()
    per_rank = max(1, threads // nproc)  # the CPUs this process had, shared for this run
    torch.set_num_threads(per_rank)
    with tempfile.TemporaryDirectory(prefix="clipse-ranks-") as rendezvous, _restoring_threads(threads):
        init_method = f"file://{Path(rendezvous) / 'store'}"
        helpers = [_start_helper(rank, nproc, init_method, per_rank) for rank in range(1, nproc)]
        session = Session(Ranks(0, nproc, 0), helpers)
        failed = True
        try:
            dist.init_process_group(_backend(), init_method=init_method, rank=0, world_size=nproc)
            yield session.ranks
            failed = False
        except Exception as exc:
            lost = None if isinstance(exc, UserError) else _dead_helper(helpers)  # rank 0's own error says it all
            if lost is None:
                raise
            raise RankLost(f"rank {helpers.index(lost) + 1} of {nproc} died ({_exit_reason(lost.returncode)}) "
                           f"during the run; its last epoch checkpoint is kept (--resume continues)") from exc
        finally:
            session.close(failed)


@contextlib.contextmanager
def _restoring_threads(threads: int) -> Iterator[None]:
    """A process that trains several runs (an inline search) gets its threads back after each."""
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _dead_helper(helpers: list[subprocess.Popen], wait_s: float = 5.0) -> subprocess.Popen | None:
    """The helper that ended (a collective failed: give its death a moment to be seen)."""
    deadline = time.monotonic() + wait_s
    while True:
        dead = next((h for h in helpers if h.poll() is not None), None)
        if dead is not None or time.monotonic() > deadline:
            return dead
        time.sleep(0.1)


def _exit_reason(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _start_helper(rank: int, world: int, init_method: str, threads: int) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
           INIT_METHOD_ENV: init_method, PARENT_PID_ENV: str(os.getpid()), "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "clipse.training.helper"], env=env)
