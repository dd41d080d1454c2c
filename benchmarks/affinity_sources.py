"""Where SANW's affinity comes from, side by side: the default fine-tuning run with SANW-Debias at
a strong and at a documented setting, once per ``--affinity`` source (online, frozen, ema,
truth), each in this process in turn, the sources' order reversed in the second round so that
the machine's drift evens out. Prints per source the last epoch's weight spread, the share of
negatives weighted below 0.9, how many true false negatives that caught (``fn_recall``) and
how many of them were true (``fn_precision``), the best validation R@1 mean, and the training
samples/s relative to ``online`` (median over rounds).

    python benchmarks/affinity_sources.py [--rounds 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clipse.config import TrainConfig  # noqa: E402
from clipse.runs.folder import RunFolder  # noqa: E402
from clipse.training import train  # noqa: E402

SOURCES = ("online", "frozen", "ema", "truth")
SETTINGS = {"strong (alpha 0.6, delta 0.6, lambda 20)": {"alpha": 0.6, "delta": 0.6, "lambda": 20.0},
            "documented (alpha 0.3, delta 0.3, lambda 2)": {"alpha": 0.3, "delta": 0.3, "lambda": 2.0}}


def run(folder: Path, source: str, setting: dict, epochs: int) -> dict[str, float]:
    config = TrainConfig.from_mapping({"loss": "sanw_debias", **setting, "affinity": source, "epochs": epochs,
                                       "progress": False, "run_dir": str(folder), "registry": str(folder / "reg.csv")},
                                      "benchmark")
    result = train(config)
    rows = RunFolder(folder).epoch_rows()
    samples = [float(row["samples_per_s"]) for row in rows]
    last = rows[-1]
    return {"weight_std": float(last["weight_std"]), "below_0.9": float(last["share_suppressed"]),
            "fn_recall": float(last["fn_recall"]), "fn_precision": float(last["fn_precision"]),
            "val_r1_mean": result.best_value, "samples_per_s": statistics.median(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipse-affinity-") as tmp:
        for name, setting in SETTINGS.items():
            measured: dict[str, list[dict[str, float]]] = {source: [] for source in SOURCES}
            for round_ in range(args.rounds):
                for source in SOURCES if round_ % 2 == 0 else reversed(SOURCES):
                    measured[source].append(run(Path(tmp) / f"{name[:6]}-{source}-{round_}", source, setting,
                                                args.epochs))
            online = statistics.median(r["samples_per_s"] for r in measured["online"])
            print(f"\nSANW-Debias, {name}; {args.epochs} epochs fine-tuning the default, {args.rounds} rounds")
            print(f"  {'source':8}{'weight std':>11}{'below 0.9':>10}{'fn_recall':>10}{'fn_precision':>13}"
                  f"{'val R@1 mean':>13}{'speed vs online':>16}")
            for source in SOURCES:
                first = measured[source][0]  # training is deterministic: every round has the same numbers
                speed = statistics.median(r["samples_per_s"] for r in measured[source]) / online
                print(f"  {source:8}{first['weight_std']:11.4f}{first['below_0.9']:10.3f}{first['fn_recall']:10.3f}"
                      f"{first['fn_precision']:13.3f}{first['val_r1_mean']:13.4f}{speed:15.2f}x")


if __name__ == "__main__":
    main()
