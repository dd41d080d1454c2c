"""Which selection picks better settings at equal compute: a plain single-seed search,
``--seeds-per-trial 2``, or ``--confirm-top 3 --confirm-seeds 2``?

For each of ``--search-seeds`` independent search seeds, the three searches of one space run
with the same budget of training runs (``--runs``, each the same number of epochs, pruning
off so that every run costs the same): (a) ``--runs`` single-seed trials; (b) ``--runs / 2``
trials of two seeds; (c) ``--runs - 6`` trials, then the 3 best confirmed with 2 more seeds.
The configuration each one picks (the best trial; the confirmed best for c) is then trained
with ``--eval-seeds`` fresh seeds and scored on the test split: the mean test R@1 mean is
what the pick is worth. Printed side by side: per method the mean and spread over search seeds
of that worth, and what the search itself claimed (its best validation value), whose excess
over the fresh validation value is the winner's curse.

    python benchmarks/selection.py [--space debias] [--search-seeds 3] [--runs 12] [--epochs 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from clipse.config import TrainConfig  # noqa: E402
from clipse.search.command import SearchOptions, run_search  # noqa: E402
from clipse.search.study import (  # noqa: E402
    load_study,
    ranked_trials,
    stored_settings,
    trial_settings,
)
from clipse.training.trainer import train  # noqa: E402

METHODS = {
    "plain": lambda runs: {"trials": runs},
    "seeds-per-trial 2": lambda runs: {"trials": runs // 2, "seeds_per_trial": 2},
    "confirm-top 3 x2": lambda runs: {"trials": runs - 6, "confirm_top": 3, "confirm_seeds": 2},
}
EVAL_SEED_BASE = 1000  # fresh seeds, used by no search


def pick(workdir: Path, method: str, search_seed: int, args) -> tuple[dict, float, int]:
    """Run one search; return the picked configuration's settings, its claimed value, and the
    epochs the search trained."""
    name = f"{method.split()[0]}-s{search_seed}"
    training = {"epochs": args.epochs, "shapes_train_images": args.train_images}
    result = run_search(SearchOptions(space=args.space, study=name, studies_dir=workdir / "studies", seed=search_seed,
                                      pruner="none", training=training, **METHODS[method](args.runs)))
    study = load_study(name, str(workdir / "studies" / name / "journal.log"))
    if result.confirmed:
        best = study.trials[result.confirmed["best"]]
        claimed = result.confirmed["trials"][0]["mean"]
    else:
        best = ranked_trials(study)[0]
        claimed = best.value
    epochs = sum(int(t.user_attrs.get("epochs_done", 0)) * len(t.user_attrs.get("seeds", [0]))
                 for t in study.get_trials())
    epochs += args.epochs * len(result.confirmed["trials"]) * 2 if result.confirmed else 0
    base = stored_settings(study).base_config()
    return TrainConfig.from_mapping(trial_settings(study, best), "picked", base=base).to_mapping(), claimed, epochs


def worth(workdir: Path, settings: dict, label: str, args) -> tuple[float, float]:
    """Mean test and validation R@1 mean of the picked settings over fresh seeds."""
    tests, vals = [], []
    for k in range(args.eval_seeds):
        config = TrainConfig.from_mapping(settings, "picked").replace(
            seed=EVAL_SEED_BASE + k, eval_test=True, progress=False, resume=False, study=None, trial=None,
            run_dir=str(workdir / "eval" / f"{label}-seed{k}"), registry=str(workdir / "registry.csv"))
        result = train(config)
        tests.append(result.test_metrics["test_r1_mean"])
        vals.append(result.best_value)
    return statistics.mean(tests), statistics.mean(vals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="debias")
    parser.add_argument("--search-seeds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=12, help="training runs per search (even, at least 8)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--eval-seeds", type=int, default=3)
    args = parser.parse_args()
    if args.runs < 8 or args.runs % 2:
        parser.error("--runs must be even and at least 8")
    rows = {method: [] for method in METHODS}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipse-selection-") as tmp:
        workdir = Path(tmp)
        for search_seed in range(args.search_seeds):
            for method in METHODS:
                settings, claimed, epochs = pick(workdir, method, search_seed, args)
                test, val = worth(workdir, settings, f"{method.split()[0]}-s{search_seed}", args)
                rows[method].append({"test": test, "val": val, "claimed": claimed, "epochs": epochs})
                print(f"search seed {search_seed}, {method}: picked test R@1 mean {test:.4f} (fresh val {val:.4f}, "
                      f"claimed {claimed:.4f}; {epochs} epochs searched) "
                      f"[{(time.perf_counter() - started) / 60:.0f} min]", file=sys.stderr, flush=True)
    print(f"\n{args.space}: {args.search_seeds} search seeds; {args.runs} training runs of {args.epochs} epochs per "
          f"search ({args.train_images} training images); picks scored with {args.eval_seeds} fresh seeds each")
    print(f"{'method':>20}{'test R@1 mean':>15}{'spread':>9}{'claimed val':>13}{'fresh val':>11}{'curse':>8}"
          f"{'epochs':>8}   per search seed (test)")
    for method, results in rows.items():
        tests = [r["test"] for r in results]
        spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
        claimed = statistics.mean(r["claimed"] for r in results)
        fresh = statistics.mean(r["val"] for r in results)
        epochs = statistics.mean(r["epochs"] for r in results)
        print(f"{method:>20}{statistics.mean(tests):15.4f}{spread:9.4f}{claimed:13.4f}{fresh:11.4f}"
              f"{claimed - fresh:8.4f}{epochs:8.0f}   " + ", ".join(f"{t:.4f}" for t in tests))


if __name__ == "__main__":
    main()
