"""Where the journal file stops scaling: many writers at once, and many trials in one file.

1. Writers: W processes share one journal and run a trial's storage traffic without training
   (ask, 4 parameters, the 14 user attrs a clipse trial sets, 3 epoch reports each with a
   heartbeat, tell), for --seconds. Prints trial lifecycles per second in all and the median
   and 95th-percentile time of one lifecycle, for each W: where the rate stops growing and the
   latency climbs, the lock (or the CPU) is the limit.
2. Size: how long a worker takes to open a study holding N trials (every clipse trial opens
   the study anew, and the journal is replayed from its first record).

    python benchmarks/journal_limits.py [--writers 1 2 4 8 16] [--seconds 10] [--sizes 1000 10000 50000]

Measured on whatever machine runs it; the storage is clipse's own (``clipse.search.study.open_storage``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from clipse.search.study import open_storage  # noqa: E402

STUDY = "journal-limits"
ATTRS = 14
EPOCHS = 3


def one_trial(study: optuna.Study) -> None:
    trial = study.ask()
    for name in ("lr", "weight_decay", "init_temperature", "alpha"):
        trial.suggest_float(name, 1e-4, 1.0, log=True)
    for i in range(ATTRS):
        trial.set_user_attr(f"attr_{i}", i * 0.5)
    for epoch in range(1, EPOCHS + 1):
        trial.report(0.1 * epoch, step=epoch)
        trial.set_user_attr("clipse:heartbeat", time.time())
    study.tell(trial, 0.3)


def writer(journal: str, seconds: float, start_at: float, out) -> None:
    study = optuna.load_study(study_name=STUDY, storage=open_storage(journal),
                              sampler=optuna.samplers.RandomSampler(seed=0))
    while time.time() < start_at:
        time.sleep(0.001)
    durations = []
    while time.time() < start_at + seconds:
        began = time.perf_counter()
        one_trial(study)
        durations.append(time.perf_counter() - began)
    out.put(durations)


def measure_writers(count: int, seconds: float, folder: Path) -> dict:
    journal = str(folder / f"writers-{count}.log")
    optuna.create_study(study_name=STUDY, storage=open_storage(journal), direction="maximize")
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    start_at = time.time() + 1.0 + 0.05 * count
    processes = [context.Process(target=writer, args=(journal, seconds, start_at, out)) for _ in range(count)]
    for p in processes:
        p.start()
    durations = [d for _ in processes for d in out.get()]
    for p in processes:
        p.join()
    durations.sort()
    return {"writers": count, "trials": len(durations), "trials_per_s": len(durations) / seconds,
            "median_ms": 1000 * statistics.median(durations),
            "p95_ms": 1000 * durations[int(0.95 * (len(durations) - 1))]}


def measure_size(trials: int, folder: Path) -> dict:
    """Open a journal of ``trials`` trials. The file is made by repeating the records of one
    trial written through the storage (with each copy's trial id), which takes seconds where
    appending them one by one, each flushed to disk, would take many minutes."""
    template = str(folder / f"template-{trials}.log")
    study = optuna.create_study(study_name=STUDY, storage=open_storage(template), direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    head_records = len(Path(template).read_text().splitlines())
    one_trial(study)
    lines = Path(template).read_text().splitlines()
    head, body = lines[:head_records], [json.loads(line) for line in lines[head_records:]]
    journal = folder / f"size-{trials}.log"
    with open(journal, "w") as handle:
        handle.write("\n".join(head) + "\n")
        for number in range(trials):
            for record in body:
                if "trial_id" in record:
                    record["trial_id"] = number
                handle.write(json.dumps(record, separators=(",", ":")) + "\n")
    began = time.perf_counter()
    fresh = optuna.load_study(study_name=STUDY, storage=open_storage(str(journal)))
    assert len(fresh.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == trials
    return {"trials": trials, "journal_mb": journal.stat().st_size / 1e6, "open_s": time.perf_counter() - began}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipse-journal-") as scratch:
        folder = Path(scratch)
        print("writers  trials/s  median ms  p95 ms   (one trial's storage traffic, no training)")
        for count in args.writers:
            row = measure_writers(count, args.seconds, folder)
            print(f"{row['writers']:>7}  {row['trials_per_s']:>8.1f}  {row['median_ms']:>9.1f}  {row['p95_ms']:>6.1f}",
                  flush=True)
        print("\ntrials  journal MB  seconds to open the study")
        for trials in args.sizes:
            row = measure_size(trials, folder)
            print(f"{row['trials']:>6}  {row['journal_mb']:>10.1f}  {row['open_s']:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
