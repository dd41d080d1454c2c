"""Test results of run folders trained with ``--eval-test``: a per-run table, mean ± std per
configuration, and the difference to a baseline with a paired-bootstrap interval and its power:

    python -m analysis.summary RUN_DIR [RUN_DIR ...] [--label-by loss] [--baseline infonce] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipse.report.summary import RunRecord, write_report
from clipse.runs.folder import RunFolder
from clipse.util.errors import UserError, cli_main


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.summary", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders trained with eval_test")
    parser.add_argument("--label-by", default="loss", help="config key that groups runs into configurations")
    parser.add_argument("--baseline", help="label of the baseline group (e.g. infonce)")
    parser.add_argument("--out", type=Path, default=Path("summary"))
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args(argv)
    records = []
    for run_dir in args.runs:
        saved = RunFolder(run_dir).saved_config()
        if saved is None:
            raise UserError(f"{run_dir}: not a finished run with test results (train with --eval-test)")
        label = saved.to_mapping().get(args.label_by, run_dir.name)
        records.append(RunRecord(run_dir, str(label), saved.seed))
    paths = write_report(records, args.baseline, args.out, f"# Test results of {len(records)} runs", args.resamples)
    print("\n".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
