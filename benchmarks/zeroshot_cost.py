"""What zero-shot evaluation adds to an epoch: one epoch of the default fine-tuning run with the
default zero-shot set (``--zeroshot auto``: the synthetic data's 400 images, 20 classes, 5
templates) and without it (``--zeroshot none``), in this process, in rounds whose order
alternates. An epoch's ``seconds`` in epochs.csv hold its training and every evaluation after
it; the report gives the median of each and their ratio (the aim: at most 1.10), and the run's
one-time measurement of the starting model.

    python benchmarks/zeroshot_cost.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clipse.config import TrainConfig  # noqa: E402
from clipse.runs.folder import RunFolder  # noqa: E402
from clipse.training import train  # noqa: E402


def one_epoch(folder: Path, zeroshot: str) -> tuple[float, float]:
    """(the epoch's seconds, the whole run's seconds)."""
    started = time.perf_counter()
    train(TrainConfig(zeroshot=zeroshot, epochs=1, progress=False, run_dir=str(folder),
                      registry=str(folder / "registry.csv")))
    return float(RunFolder(folder).epoch_rows()[-1]["seconds"]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    epochs: dict[str, list[float]] = {"none": [], "auto": []}
    runs: dict[str, list[float]] = {"none": [], "auto": []}
    one_epoch(Path(tempfile.mkdtemp(prefix="clipse-zs-warm-")), "auto")  # caches built outside the rounds
    with tempfile.TemporaryDirectory(prefix="clipse-zs-") as tmp:
        for round_ in range(args.rounds):
            for setting in ("none", "auto") if round_ % 2 == 0 else ("auto", "none"):
                epoch, run = one_epoch(Path(tmp) / f"{setting}-{round_}", setting)
                epochs[setting].append(epoch)
                runs[setting].append(run)
    plain, measured = statistics.median(epochs["none"]), statistics.median(epochs["auto"])
    extra_start = statistics.median(runs["auto"]) - statistics.median(runs["none"]) - (measured - plain)
    print(f"one epoch of the default fine-tuning run, {args.rounds} rounds (median seconds, training and evaluation)")
    print(f"  --zeroshot none  {plain:7.2f} s   {', '.join(f'{s:.2f}' for s in epochs['none'])}")
    print(f"  --zeroshot auto  {measured:7.2f} s   {', '.join(f'{s:.2f}' for s in epochs['auto'])}")
    print(f"epoch time ratio (auto / none): {measured / plain:.3f}  (+{100 * (measured / plain - 1):.1f}%)")
    print(f"the starting model's measurement, once per run: about {extra_start:.2f} s")


if __name__ == "__main__":
    main()
