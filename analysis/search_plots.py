"""Figures of a search drawn by Optuna's own matplotlib plots (history or Pareto front, parameter
importances, intermediate values, timeline, SANW slices):

    python -m analysis.search_plots STUDY_NAME --storage studies/NAME/journal.log [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipse.report.search_plots import plot_search
from clipse.search.study import load_study, secure_storage
from clipse.util.errors import cli_main


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.search_plots", description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--storage", required=True, help="RDB URL or journal file path")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    with secure_storage(args.storage) as storage:
        for path in plot_search(load_study(args.study, storage), args.out).values():
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
