"""Each loss's training speed against InfoNCE's: one epoch of the default fine-tuning run per loss
(its default parameters), in this process, in rounds whose order alternates, reporting the
median samples/s of each loss divided by InfoNCE's (higher is faster; the aim is at least 1/1.1).

    python benchmarks/loss_step_time.py [--rounds 3] [--losses infonce,sanw_debias,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clipse.config import TrainConfig  # noqa: E402
from clipse.losses import loss_names  # noqa: E402
from clipse.runs.folder import RunFolder  # noqa: E402
from clipse.training import train  # noqa: E402


def samples_per_s(folder: Path, loss: str) -> float:
    train(TrainConfig(loss=loss, epochs=1, progress=False, run_dir=str(folder), registry=str(folder / "reg.csv")))
    return float(RunFolder(folder).epoch_rows()[-1]["samples_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--losses", default=",".join(loss_names()))
    args = parser.parse_args()
    losses = ["infonce", *(name for name in args.losses.split(",") if name != "infonce")]
    rates: dict[str, list[float]] = {loss: [] for loss in losses}
    with tempfile.TemporaryDirectory(prefix="clipse-losses-") as tmp:
        for round_ in range(args.rounds):
            for loss in losses if round_ % 2 == 0 else reversed(losses):
                rates[loss].append(samples_per_s(Path(tmp) / f"{loss}-{round_}", loss))
    baseline = statistics.median(rates["infonce"])
    print(f"one epoch of the default fine-tuning run per loss, {args.rounds} rounds (median samples/s)")
    for loss in losses:
        rate = statistics.median(rates[loss])
        print(f"  {loss:14} {rate:8.0f} samples/s   {rate / baseline:5.2f}x InfoNCE's speed   "
              f"(step time {baseline / rate:5.2f}x)")


if __name__ == "__main__":
    main()
