"""Pruning efficiency: the same search with and without pruning, side by side in one run.

Both studies use the same space, trials, seed and data; the sampler therefore proposes the
same first trials, and the difference is what the pruner stops. Reports epochs trained, wall
time and best value of each, and their ratios.

    python benchmarks/pruning.py [--space bandpass] [--trials 50] [--pruner median]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from clipse.search.study import open_storage  # noqa: E402


def run_study(workdir: Path, name: str, args, pruner: str) -> dict:
    command = [sys.executable, "-m", "clipse.search", "--space", args.space, "--trials", str(args.trials),
               "--study", name, "--studies-dir", str(workdir / "studies"), "--seed", str(args.seed),
               "--pruner", pruner]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    storage = open_storage(str(workdir / "studies" / name / "journal.log"))
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    epochs = sum(int(t.user_attrs.get("epochs_done", 0)) for t in trials)
    best = max(t.value for t in trials if t.state == TrialState.COMPLETE)
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    return {"name": name, "seconds": seconds, "epochs": epochs, "best": best, "pruned": pruned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="bandpass")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pruner", default="median")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipse-pruning-") as tmp:
        workdir = Path(tmp)
        pruned = run_study(workdir, "with-pruning", args, args.pruner)
        print(f"with {args.pruner} pruning: {pruned}", flush=True)
        full = run_study(workdir, "without-pruning", args, "none")
        print(f"without pruning: {full}", flush=True)
    print(f"\n{args.trials} trials of '{args.space}', seed {args.seed}")
    print(f"{'':18}{'epochs':>8}{'wall s':>9}{'best':>9}{'pruned':>8}")
    for label, r in ((f"{args.pruner} pruner", pruned), ("no pruning", full)):
        print(f"{label:18}{r['epochs']:8d}{r['seconds']:9.0f}{r['best']:9.4f}{r['pruned']:8d}")
    print(f"epochs with / without pruning: {pruned['epochs'] / full['epochs']:.2f}")
    print(f"wall time with / without pruning: {pruned['seconds'] / full['seconds']:.2f}")
    print(f"best value difference (without - with): {full['best'] - pruned['best']:+.4f}")


if __name__ == "__main__":
    main()
