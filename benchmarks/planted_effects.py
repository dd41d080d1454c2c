"""The harness's own positive and negative controls: effects whose sign is known, put through the
final report's statistics (``clipse.report.summary.write_report``, as ``clipse.final`` does).

- planted harm: the default fine-tuning run with ``--caption-noise`` (a share of its training
  captions shuffled among their pairs) against the same run without it: the report must find
  it worse, with an interval of the R@1 mean difference that excludes zero;
- planted zeros: the same configuration under two names, trained with the same seeds (training
  is deterministic on the CPU, so the difference must be exactly 0: the pairing and the
  statistics add nothing of their own), and trained with other seeds (1000 onwards), paired with
  the baseline's seeds in order (a difference of seed noise only, which the report must not call
  an effect; at 95% it may, in about one repetition in twenty).

    python benchmarks/planted_effects.py [--seeds 3] [--noise 0.5] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clipse.config import TrainConfig  # noqa: E402
from clipse.report.summary import RunRecord, write_report  # noqa: E402
from clipse.training import train  # noqa: E402

OTHER_SEEDS = 1000  # the first seed of the planted zero trained with other seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--out", type=Path, help="keep the runs and reports here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipse-planted-") as tmp:
        out = args.out or Path(tmp)
        # label: (setting changes, the first seed it trains with); the report pairs runs by position
        labels = {"baseline": ({}, 0), "same-as-baseline": ({}, 0), "same-other-seeds": ({}, OTHER_SEEDS),
                  f"captions-shuffled-{args.noise:g}": ({"caption_noise": args.noise}, 0)}
        records = []
        for label, (changes, first_seed) in labels.items():
            for seed in range(args.seeds):
                folder = out / "runs" / f"{label}-seed{first_seed + seed}"
                config = TrainConfig.from_mapping({**changes, "seed": first_seed + seed, "eval_test": True, "resume": True,
                                                   "progress": False, "run_dir": str(folder),
                                                   "registry": str(out / "registry.csv")}, "benchmark")
                train(config)
                records.append(RunRecord(folder, label, seed))
        files = write_report(records, "baseline", out / "report", "# Planted effects", resamples=2000)
        summary = pd.read_csv(files["summary_csv"]).set_index(["label", "metric"])
        for label in labels:
            if label == "baseline":
                continue
            row = summary.loc[(label, "r1_mean")]
            low, high = row["ci_low"], row["ci_high"]
            excludes = low > 0 or high < 0
            print(f"{label}: test R@1 mean {100 * row['mean']:.2f} vs baseline "
                  f"{100 * summary.loc[('baseline', 'r1_mean'), 'mean']:.2f}; difference {100 * row['diff']:+.2f} "
                  f"[{100 * low:+.2f}, {100 * high:+.2f}] ({args.seeds} seeds): "
                  + ("an effect, " + ("worse" if high < 0 else "better") if excludes else "no clear difference"))
        print(f"report: {files['summary_md']}" if args.out else "")


if __name__ == "__main__":
    main()
