"""Two searches side by side: which trials got the same parameters, states and values, and where
they part. For checking that a change leaves a search as it was (or says by how much it moved
it), and for a paired comparison of two studies that differ in one fixed setting (the same space
and sampler seed draw the same start-up trials): over the trials with the same parameters that
completed in both, each study's mean best validation value and the per-trial differences.

    python benchmarks/compare_studies.py STUDY_A_JOURNAL STUDY_B_JOURNAL [--study bandpass] [--study-b NAME]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clipse.search.study import open_storage  # noqa: E402


def trials(journal: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=open_storage(journal)).get_trials(deepcopy=False)


def describe(trial: optuna.trial.FrozenTrial | None) -> str:
    if trial is None:
        return "-"
    value = f" {trial.value:.4f}" if trial.value is not None else ""
    last = max(trial.intermediate_values, default=0)
    return f"{trial.state.name}{value} ({last} epochs)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="journal (or RDB URL) of the first search")
    parser.add_argument("b", help="journal (or RDB URL) of the second search")
    parser.add_argument("--study", default="bandpass")
    parser.add_argument("--study-b", help="the second search's study name (default: --study)")
    args = parser.parse_args()
    a, b = trials(args.a, args.study), trials(args.b, args.study_b or args.study)
    same_params = same_state = same_values = 0
    first_difference = None
    largest = 0.0
    paired: list[tuple[float, float]] = []  # best per-epoch value of a and b, same parameters, both complete
    for number in range(max(len(a), len(b))):
        ta = a[number] if number < len(a) else None
        tb = b[number] if number < len(b) else None
        if ta is None or tb is None:
            continue
        params = ta.params == tb.params
        values = ta.intermediate_values == tb.intermediate_values and ta.value == tb.value
        same_params += params
        same_state += ta.state == tb.state
        same_values += values
        shared = set(ta.intermediate_values) & set(tb.intermediate_values)
        if params and shared:
            largest = max(largest, max(abs(ta.intermediate_values[e] - tb.intermediate_values[e]) for e in shared))
        if first_difference is None and not (params and values and ta.state == tb.state):
            first_difference = number
        if params and ta.state == tb.state == optuna.trial.TrialState.COMPLETE:
            paired.append((max(ta.intermediate_values.values()), max(tb.intermediate_values.values())))
    print(f"{len(a)} and {len(b)} trials; same parameters: {same_params}, same state: {same_state}, "
          f"same per-epoch values: {same_values}")
    print(f"largest difference of a per-epoch value between trials with the same parameters: {largest:.6f}")
    if paired:
        differences = [vb - va for va, vb in paired]
        print(f"{len(paired)} trials with the same parameters completed in both: mean best value "
              f"{sum(va for va, _ in paired) / len(paired):.4f} (a) vs {sum(vb for _, vb in paired) / len(paired):.4f} (b); "
              f"b - a per trial {min(differences):+.4f} to {max(differences):+.4f}")
    if first_difference is not None:
        print(f"first trial that differs: {first_difference}: {describe(a[first_difference])} vs "
              f"{describe(b[first_difference])}")
    for name, group in (("a", a), ("b", b)):
        done = [t for t in group if t.value is not None and math.isfinite(t.value)]
        best = max(done, key=lambda t: t.value, default=None)
        print(f"best of {name}: " + (f"trial {best.number} {best.value:.4f}" if best else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
