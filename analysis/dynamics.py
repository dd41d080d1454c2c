"""Training dynamics of run folders in one figure (loss, temperature, learning rate, SANW weight
statistics over steps; validation R@1 over epochs):

    python -m analysis.dynamics RUN_DIR [RUN_DIR ...] [--out dynamics.png] [--label-by loss]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipse.runs.folder import RunFolder
from clipse.runs.plots import plot_runs, run_label
from clipse.util.errors import UserError, cli_main


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.dynamics", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with training.csv / epochs.csv)")
    parser.add_argument("--out", type=Path, default=Path("dynamics.png"))
    parser.add_argument("--label-by", default="loss", help="config key that groups runs by colour, or 'run'")
    args = parser.parse_args(argv)
    for run_dir in args.runs:
        folder = RunFolder(run_dir)
        if not folder.epochs_csv.exists() and not folder.training_csv.exists():
            raise UserError(f"not a run folder (no training.csv or epochs.csv): {run_dir}")
    plot_runs([(r, run_label(r, args.label_by)) for r in args.runs], args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
