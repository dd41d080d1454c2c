"""Chaos soak: a search with several workers (local processes or SLURM jobs) while a seeded
schedule of faults hits it, then checks that the study lost nothing.

    python benchmarks/chaos.py [--faults 20] [--trials 16] [--workers 4] [--seed 0] [--executor local|slurm]
                               [--keep DIR]

Faults (a fixed mix in an order drawn with the seed; each but a torn journal waits until the
study has moved on since the last one, and one that stops the command also until the command
has started):
  kill-worker          SIGKILL a worker process in the middle of its trial
  tear-journal         append half a record to the journal, as a writer dying mid-append leaves it
                       (written under the journal's lock, which the dying writer would have held)
  kill-coordinator     SIGKILL the search command (its workers are left to themselves)
  sigterm-coordinator  SIGTERM the search command (what a scheduler sends before SIGKILL)
  sigint-coordinator   Ctrl-C: SIGINT to the command's whole process group, as a terminal sends it
After a fault that stops the command, the same command is run again. After the schedule, the
command runs to the end, and the soak checks and prints:
  - every stop of the command is one a fault explains (130 after SIGTERM and Ctrl-C), and its
    last run ends with 0;
  - the study reached its total, and no trial is left RUNNING or WAITING; the journal is sound;
  - no COMPLETE or PRUNED record seen during the soak was lost or changed;
  - no two completed trials share a run folder or their parameters, and each folder's settings
    are its trial's;
  - every completed trial's run folder, checkpoints, result.json and its one registry row exist
    and agree with its value;
  - every retried trial resumed from its last checkpoint: no epoch its lost attempt had reported
    was trained again (the epochs the completed trials needed vs those trained twice).
Exit status 0 when every check holds, 1 otherwise.

With ``--storage postgres`` the study lives in a throw-away PostgreSQL server the soak starts
(``scripts/postgres_server.py``; root and Debian's postgresql needed), the search gets
``--storage-grace`` 20 s, and storage faults replace the torn journal records:
  pg-restart           ``pg_ctl restart -m fast``: every session cut, the server back in a second
  pg-outage            the server stopped for a drawn 2-12 s, then started (shorter than the grace)
  pg-long-outage       the server stopped until the command gives up (exit 75), then started and
                       the command run again
Storage faults land once the command is up: a command that cannot reach its storage when it
starts ends at once in one line (a wrong URL is not a wait), which is not what the soak tests.
A stop signal that lands after the last trial finished may find the command ending with 0.
With ``--executor slurm`` the trials are jobs of the SLURM cluster (``scripts/slurm_cluster.sh``
brings up a one-node one), a killed worker is the job's process, and one more fault joins:
  requeue-job          ``scontrol requeue`` of a running trial's job (it must continue its trial)
At the end the soak cancels the jobs it saw, and only those.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from clipse.runs.folder import RunFolder, read_csv  # noqa: E402
from clipse.search.journal import check_journal  # noqa: E402
from clipse.search.study import (  # noqa: E402
    LOST_ATTR,
    OWNER_ATTR,
    RETRY_OF_ATTR,
    RUN_DIR_ATTR,
    count_trials,
    retried_numbers,
)

sys.path.insert(0, str(ROOT / "scripts"))
from postgres_server import ThrowawayPostgres  # noqa: E402

STUDY = "chaos"
TORN = b'{"op_code":8,"worker_id":"chaos","trial_id":0,"user_attr":{"torn'
# the default schedule's mix, per 20 faults (restarting the command costs the most time)
FAULTS = {"kill-worker": 10, "tear-journal": 7, "kill-coordinator": 1, "sigterm-coordinator": 1, "sigint-coordinator": 1}
SLURM_FAULTS = {**FAULTS, "kill-worker": 7, "requeue-job": 3}
POSTGRES_FAULTS = {"kill-worker": 8, "pg-restart": 3, "pg-outage": 5, "pg-long-outage": 1, "kill-coordinator": 1,
                   "sigterm-coordinator": 1, "sigint-coordinator": 1}
STORAGE_GRACE_S = 20
SLURM_FLAGS = ["--cpus-per-task", "1", "--mem-gb", "2", "--slurm-poll", "1", "--time-min", "20"]
TINY = ["--shapes-train-images", "48", "--shapes-val-images", "12", "--shapes-test-images", "12",
        "--batch-size", "16", "--epochs", "3"]


@dataclass
class Soak:
    workdir: Path
    args: argparse.Namespace
    rng: random.Random
    process: subprocess.Popen | None = None
    log_start: int = 0                                   # where the running command's output begins in search.log
    groups: set[int] = field(default_factory=set)         # process groups started here (stopped at the end)
    seen_finished: dict[int, tuple[str, float | None]] = field(default_factory=dict)
    applied: dict[str, int] = field(default_factory=dict)
    restarts: int = 0
    unexpected: list[str] = field(default_factory=list)  # exits the faults do not explain
    postgres: object | None = None                       # the throw-away server (--storage postgres)
    outage_seconds: list[float] = field(default_factory=list)

    @property
    def journal(self) -> Path:
        return self.workdir / "studies" / STUDY / "journal.log"

    @property
    def storage_flags(self) -> list[str]:
        if self.postgres is None:
            return []
        return ["--storage", self.postgres.url("chaos"), "--storage-grace", str(STORAGE_GRACE_S)]

    def command(self) -> list[str]:
        return [sys.executable, "-m", "clipse.search", "--space", "baseline", "--trials", str(self.args.trials),
                "--study", STUDY, "--studies-dir", str(self.workdir / "studies"), "--seed", str(self.args.seed),
                "--executor", self.args.executor, "--workers", str(self.args.workers), "--pruner", "none",
                "--max-retries", "100", "--heartbeat-grace", "20", "--data-root", str(self.workdir / "shapes"), *TINY,
                *(SLURM_FLAGS if self.args.executor == "slurm" else []), *self.storage_flags]

    def start(self) -> None:
        log = open(self.workdir / "search.log", "a")
        self.log_start = log.tell()
        self.process = subprocess.Popen(self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.groups.add(self.process.pid)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def study(self) -> optuna.Study | None:
        if self.postgres is not None:
            try:
                return optuna.load_study(study_name=STUDY, storage=self.postgres.url("chaos"))
            except Exception:  # not created yet, or the server is down for a fault
                return None
        if not self.journal.exists():
            return None
        try:  # read through plain Optuna: the soak must not cut torn tails itself, clipse's processes must
            storage = optuna.storages.JournalStorage(JournalFileBackend(str(self.journal)))
            return optuna.load_study(study_name=STUDY, storage=storage)
        except KeyError:
            return None

    def finished(self) -> bool:
        """Every trial of the study finished: a signal landing now finds nothing left to stop."""
        study = self.study()
        return study is not None and count_trials(study).finished >= self.args.trials

    def progress(self) -> int:
        """Epochs reported by all trials so far: the soak waits for it to move between faults."""
        study = self.study()
        return sum(len(t.intermediate_values) for t in study.get_trials(deepcopy=False)) if study else 0

    def remember_finished(self) -> None:
        study = self.study()
        for t in study.get_trials(deepcopy=False) if study else []:
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                self.seen_finished.setdefault(t.number, (t.state.name, t.value))

    def worker_pids(self) -> list[int]:
        """Live workers in the middle of a trial (a RUNNING trial's owner)."""
        study = self.study()
        pids = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if study else []:
            pid = (t.user_attrs.get(OWNER_ATTR) or {}).get("pid")
            if pid and _alive(pid):
                pids.append(pid)
        return pids

    def wait_for_progress(self, since: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and self.running():
            if self.progress() > since:
                return
            time.sleep(0.3)

    def wait_until_started(self, timeout: float = 120) -> None:
        """Until the command has printed its study line: its signal handling is in place from
        then on. (A signal while Python is still importing ends it the default way, before it
        has touched the study; orphaned workers of a killed command report epochs meanwhile, so
        progress alone does not say the new command is up.)"""
        deadline = time.time() + timeout
        while time.time() < deadline and self.running():
            with open(self.workdir / "search.log", "rb") as log:
                log.seek(self.log_start)
                if f"study '{STUDY}'".encode() in log.read():
                    return
            time.sleep(0.2)
        if self.running():
            self.unexpected.append(f"the command printed no study line within {timeout:.0f} s")

    def stop_and_restart(self, send, expected_exit: int) -> None:
        self.wait_until_started()
        send()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.unexpected.append("the command did not stop within 60 s")
        if self.process.returncode != expected_exit and not (self.process.returncode == 0 and self.finished()):
            self.unexpected.append(f"the command exited {self.process.returncode}, expected {expected_exit}")
        self.restarts += 1
        self.start()

    def apply(self, fault: str) -> bool:
        """Apply one fault; False when it had nothing to hit (no worker in a trial)."""
        if fault == "kill-worker":
            deadline = time.time() + 10
            while not (pids := self.worker_pids()) and time.time() < deadline and self.running():
                time.sleep(0.2)  # between two trials: wait for the next to start
            if not pids:
                return False
            os.kill(self.rng.choice(pids), signal.SIGKILL)
        elif fault == "tear-journal":
            lock = JournalFileSymlinkLock(str(self.journal))
            lock.acquire()
            try:
                with open(self.journal, "ab") as handle:
                    handle.write(TORN)
            finally:
                lock.release()
        elif fault == "pg-restart":
            self.wait_until_started()  # a command opening its storage must reach it at once (documented)
            self.postgres.restart()
        elif fault == "pg-outage":
            self.wait_until_started()
            length = self.rng.uniform(2, 12)
            self.postgres.stop()
            time.sleep(length)
            self.postgres.start()
            self.outage_seconds.append(length)
        elif fault == "pg-long-outage":
            self.wait_until_started()
            started = time.time()
            self.postgres.stop()
            try:
                self.process.wait(timeout=STORAGE_GRACE_S + 60)
            except subprocess.TimeoutExpired:
                self.unexpected.append("the command did not give up on an unreachable storage")
            self.outage_seconds.append(time.time() - started)
            self.postgres.start()
            if self.process.returncode != 75:
                self.unexpected.append(f"after a long outage the command exited {self.process.returncode}, expected 75")
            self.restarts += 1
            self.start()
        elif fault == "requeue-job":
            jobs = self.running_jobs()
            if not jobs or subprocess.run(["scontrol", "requeue", self.rng.choice(jobs)],
                                          capture_output=True).returncode != 0:
                return False
        elif fault == "kill-coordinator":
            self.stop_and_restart(lambda: self.process.send_signal(signal.SIGKILL), -signal.SIGKILL)
        elif fault == "sigterm-coordinator":
            self.stop_and_restart(lambda: self.process.send_signal(signal.SIGTERM), 130)
        elif fault == "sigint-coordinator":
            self.stop_and_restart(lambda: os.killpg(self.process.pid, signal.SIGINT), 130)
        self.applied[fault] = self.applied.get(fault, 0) + 1
        return True

    def slurm_jobs(self, states=None) -> list[str]:
        study = self.study()
        jobs = []
        for t in study.get_trials(deepcopy=False, states=states) if study else []:
            job, task = t.user_attrs.get("slurm_job_id"), t.user_attrs.get("slurm_array_task_id")
            if job:
                jobs.append(f"{job}_{task}" if task is not None else str(job))
        return jobs

    def running_jobs(self) -> list[str]:
        return self.slurm_jobs((TrialState.RUNNING,))

    def cleanup(self) -> None:
        if self.args.executor == "slurm" and (jobs := self.slurm_jobs()):
            subprocess.run(["scancel", *jobs], capture_output=True)  # only this soak's jobs
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def schedule(rng: random.Random, faults: int, mix: dict[str, int]) -> list[str]:
    """``faults`` faults in ``mix`` (scaled, at least one of each kind), in seeded order."""
    total = sum(mix.values())
    planned = [kind for kind, share in mix.items() for _ in range(max(1, round(faults * share / total)))]
    rng.shuffle(planned)
    return planned[:faults]


def run_soak(soak: Soak) -> None:
    soak.start()
    mix = POSTGRES_FAULTS if soak.postgres is not None else SLURM_FAULTS if soak.args.executor == "slurm" else FAULTS
    planned = schedule(soak.rng, soak.args.faults, mix)
    soak.wait_for_progress(0)  # the first epoch: the study and its workers are up
    since = soak.progress()
    for number, fault in enumerate(planned, start=1):
        if not soak.running():  # the study finished before the schedule did
            break
        if fault != "tear-journal":  # a fault that stops work waits until the study has moved on
            soak.wait_for_progress(since)
        time.sleep(soak.rng.uniform(0.0, 1.5))
        soak.remember_finished()
        hit = soak.apply(fault) if soak.running() else False
        print(f"fault {number}/{len(planned)}: {fault}{'' if hit else ' (nothing to hit)'}", flush=True)
        since = soak.progress()
    if soak.running():
        soak.process.wait(timeout=soak.args.timeout)
    if soak.process.returncode != 0:
        soak.unexpected.append(f"the command exited {soak.process.returncode} between faults")
        soak.start()  # once more to the end, to see what else was lost
        soak.process.wait(timeout=soak.args.timeout)
    if soak.process.returncode != 0:
        soak.unexpected.append(f"the last run of the command exited {soak.process.returncode}")


def verify(soak: Soak) -> list[str]:
    """The soak's checks; returns the ones that failed."""
    problems = list(soak.unexpected)
    if soak.postgres is None and soak.journal.exists() and check_journal(soak.journal).corrupt_line is not None:
        problems.append(check_journal(soak.journal).describe())
    study = soak.study()
    if study is None:
        raise SystemExit(f"the search never created its study; see {soak.workdir / 'search.log'}")
    trials = study.get_trials(deepcopy=False)
    counts = count_trials(study)
    if counts.finished != soak.args.trials or counts.failed:
        problems.append(f"total: {counts.finished} finished ({counts.failed} failed for good), wanted {soak.args.trials}")
        retried = retried_numbers(trials)
        problems += [f"trial {t.number} failed for good: "
                     f"{t.system_attrs.get(LOST_ATTR) or t.user_attrs.get('error') or 'no reason recorded'}"
                     for t in trials if t.state == optuna.trial.TrialState.FAIL and t.number not in retried]
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    params = [tuple(sorted(t.params.items())) for t in counted]
    twice = sorted({t.number for t, p in zip(counted, params) if params.count(p) > 1})
    if twice:
        problems.append(f"trials {twice} trained the same parameters (each point counts once)")
    left = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    if left:
        problems.append(f"trials left running or waiting: {left}")
    by_number = {t.number: t for t in trials}
    for number, (state, value) in soak.seen_finished.items():
        now = by_number.get(number)
        if now is None or now.state.name != state or now.value != value:
            problems.append(f"trial {number} was {state} {value}, now {now.state.name if now else 'missing'}")

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    run_dirs = [t.user_attrs.get(RUN_DIR_ATTR) for t in complete]
    if len(set(run_dirs)) != len(run_dirs):
        problems.append("two completed trials share a run folder")
    registry = read_csv(soak.workdir / "studies" / "run_registry.csv")
    for t in complete:
        folder = RunFolder(t.user_attrs[RUN_DIR_ATTR])
        saved = folder.saved_config()
        result = folder.result()
        if saved is None or result is None or not folder.best_checkpoint.exists() or not folder.last_checkpoint.exists():
            problems.append(f"trial {t.number}: run folder incomplete")
            continue
        if any(getattr(saved, key) != value for key, value in t.params.items()):
            problems.append(f"trial {t.number}: run folder trained other parameters")
        if result.status != "completed" or result.best_value != t.value:
            problems.append(f"trial {t.number}: result.json says {result.status} {result.best_value}, trial {t.value}")
        rows = [r for r in registry if r["run_dir"] == str(folder.path)]
        if len(rows) != 1 or rows[0]["status"] != "completed" or abs(float(rows[0]["val_r1_mean"]) - t.value) > 1e-12:
            problems.append(f"trial {t.number}: {len(rows)} registry rows, not one that agrees")

    retrained = 0  # epochs a lost attempt had reported that its retry's folder shows trained again
    for retry in (t for t in trials if RETRY_OF_ATTR in t.user_attrs and t.state == TrialState.COMPLETE):
        lost = by_number[retry.user_attrs[RETRY_OF_ATTR]]
        earlier_pids, attempt = set(), lost
        while attempt is not None:  # the lost attempt and the attempts it continued
            earlier_pids.add((attempt.user_attrs.get(OWNER_ATTR) or {}).get("pid"))
            attempt = by_number.get(attempt.user_attrs.get(RETRY_OF_ATTR, -1))
        rows = RunFolder(retry.user_attrs[RUN_DIR_ATTR]).epoch_rows()[:len(lost.intermediate_values)]
        retrained += sum(int(r["trained_by_pid"]) not in earlier_pids for r in rows)
    if retrained:
        problems.append(f"{retrained} epochs reported before a fault were trained again")
    torn_cut = len(list(soak.journal.parent.glob("journal.log.torn-*")))
    if soak.applied.get("tear-journal") and not torn_cut:
        problems.append("torn journal records were written, and none was cut")
    soak.summary = {
        "faults": sum(soak.applied.values()), "by_kind": soak.applied, "restarts": soak.restarts,
        "complete": counts.complete, "retries": sum(RETRY_OF_ATTR in t.user_attrs for t in trials),
        "epochs_needed": sum(len(RunFolder(t.user_attrs[RUN_DIR_ATTR]).epoch_rows()) for t in complete),
        "epochs_retrained": retrained, "torn_tails_cut": torn_cut,
        "finished_records_checked": len(soak.seen_finished), "lost": len(problems),
        "outage_seconds": [round(s, 1) for s in soak.outage_seconds],
    }
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=20)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--executor", choices=("local", "slurm"), default="local",
                        help="slurm: trials as jobs of the cluster SLURM_CONF names (adds requeue-job faults)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds the last run may take")
    parser.add_argument("--storage", choices=("journal", "postgres"), default="journal",
                        help="postgres: the study in a throw-away PostgreSQL server, with storage faults")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipse-chaos-") as scratch:
        workdir = args.keep or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        soak = Soak(workdir, args, random.Random(args.seed))
        if args.storage == "postgres":
            soak.postgres = ThrowawayPostgres.create()
            if soak.postgres is None:
                raise SystemExit("--storage postgres needs root and Debian's postgresql (apt install postgresql)")
            soak.postgres.sql("CREATE DATABASE chaos")
        started = time.perf_counter()
        try:
            run_soak(soak)
            problems = verify(soak)
        finally:
            soak.cleanup()
            if soak.postgres is not None:
                soak.postgres.close()
        summary = soak.summary
        print(json.dumps({**summary, "seconds": round(time.perf_counter() - started, 1)}))
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary["by_kind"].items()))
        print(f"{summary['faults']} faults ({kinds}), {summary['restarts']} restarts of the command: the study "
              f"reached {summary['complete']}/{args.trials} complete with {summary['retries']} retries; "
              f"{summary['finished_records_checked']} finished records checked, {len(problems)} lost or wrong; "
              f"of the {summary['epochs_needed']} epochs the completed trials needed, {summary['epochs_retrained']} "
              f"reported before a fault were trained again; {summary['torn_tails_cut']} torn journal tails cut"
              + (f"; storage outages of {', '.join(f'{s:.0f}' for s in summary['outage_seconds'])} s"
                 if summary["outage_seconds"] else ""))
        for problem in problems:
            print(f"FAILED: {problem}")
        return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
