"""How much SANW actually reweights: the spread of the negative weights over a space.

Runs a random-sampler search of each SANW space (no pruning, the default training settings)
and prints, per space, the quantiles of every trial's last-epoch weight std and the validation
R@1 mean of the trials below and above candidate floors. This is the measurement behind the
``min_weight_std`` the debias and bandpass spaces ship with (docs/methodology/verdicts.md).

    python benchmarks/weight_spread.py [--trials 20] [--spaces debias,bandpass]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from clipse.search.study import open_storage  # noqa: E402

FLOORS = (0.01, 0.02, 0.05, 0.1)


def spreads(workdir: Path, space: str, args) -> list[tuple[float, float]]:
    """(last-epoch weight std, best val R@1 mean) of every completed trial of a random search."""
    subprocess.run([sys.executable, "-m", "clipse.search", "--space", space, "--trials", str(args.trials),
                    "--sampler", "random", "--pruner", "none", "--min-weight-std", "0", "--seed", str(args.seed),
                    "--studies-dir", str(workdir / "studies")], check=True, cwd=workdir,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    study = optuna.load_study(study_name=space, storage=open_storage(str(workdir / "studies" / space / "journal.log")))
    return [(t.user_attrs["weights_weight_std"], t.value) for t in study.get_trials(states=(TrialState.COMPLETE,))
            if t.user_attrs.get("weights_weight_std") is not None]  # a run that diverged at once logged none


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--spaces", default="debias,bandpass")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipse-spread-") as tmp:
        for space in args.spaces.split(","):
            measured = np.array(spreads(Path(tmp), space, args))
            std, value = measured[:, 0], measured[:, 1]
            quantiles = np.quantile(std, [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1])
            print(f"\n{space}: {len(std)} random trials, last-epoch weight std")
            print("  min / 10% / 25% / median / 75% / 90% / max: " + " / ".join(f"{q:.4f}" for q in quantiles))
            print(f"  {'floor':>8}{'below':>7}{'R@1 mean below':>16}{'R@1 mean above':>16}")
            for floor in FLOORS:
                below = std < floor
                mean = lambda mask: f"{value[mask].mean():.4f}" if mask.any() else "-"  # noqa: E731
                print(f"  {floor:8.3f}{int(below.sum()):7d}{mean(below):>16}{mean(~below):>16}")
            best = int(np.argmax(value))
            print(f"  best trial: R@1 mean {value[best]:.4f} with weight std {std[best]:.4f}")


if __name__ == "__main__":
    main()
