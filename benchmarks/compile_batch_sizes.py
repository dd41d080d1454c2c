"""``--compile`` after an epoch's smaller last batch: clipse's training graphs keep their batch size
(``torch._dynamo.mark_static`` in ``clipse.training.global_batch.encode_pair``) against torch.compile's
automatic behaviour (the same trainer with that hint switched off), which after a second batch
size compiles one graph for every size and runs every later batch through it; and, for scale,
the same trainer without ``--compile``.

All three train the same config for ``--epochs`` epochs in this process, alternating for
``--rounds`` rounds; the figure is the training samples/s of the epochs after the first
(``epochs.csv``: the first epoch holds the compilation and leaves out validation in every epoch).

    python benchmarks/compile_batch_sizes.py        # clipse-tiny-64, batch 128: the epoch ends with 112
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from clipse.config import TrainConfig  # noqa: E402
from clipse.data.sampling import random_batches  # noqa: E402
from clipse.training.assembly import dataset_for, model_for, split_tensors  # noqa: E402
from clipse.training.trainer import train  # noqa: E402

STATIC, AUTOMATIC, EAGER = "compiled, static sizes (clipse)", "compiled, automatic", "eager"


def later_epochs_rate(config: TrainConfig, run_dir: Path, variant: str) -> float:
    """Median training samples/s of the epochs after the first (a compiled run starts from fresh
    compile caches: clipse's prepare_model resets them)."""
    with mock.patch("torch._dynamo.mark_static") if variant == AUTOMATIC else contextlib.nullcontext():
        result = train(config.replace(run_dir=str(run_dir), compile=variant != EAGER))
    return statistics.median(pd.read_csv(Path(result.run_dir) / "epochs.csv")["samples_per_s"].iloc[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the epochs after the first are timed")
    parser.add_argument("--model", default="clipse-tiny-64")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    if args.epochs < 2:
        sys.exit("--epochs must be at least 2: the epochs after the first are timed")
    config = TrainConfig.from_mapping({"epochs": args.epochs, "model": args.model, "batch_size": args.batch_size,
                                       "compile": True, "progress": False}, "benchmark")
    pairs = len(split_tensors(dataset_for(config), "train", model_for(config)).tokens)  # decoded before timing
    last = len(random_batches(pairs, args.batch_size, 0, 0)[-1])  # the trainer's batching
    if last == args.batch_size:
        sys.exit(f"{pairs} pairs make whole batches of {args.batch_size}: pick another --batch-size")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            rates = {variant: later_epochs_rate(config, Path(tmp) / f"{round_}-{variant}", variant)
                     for variant in (STATIC, AUTOMATIC, EAGER)}
            rows.append({"round": round_ + 1, **{f"{name} samples/s": rate for name, rate in rates.items()},
                         "static/automatic": rates[STATIC] / rates[AUTOMATIC], "static/eager": rates[STATIC] / rates[EAGER]})
            print(f"round {round_ + 1}: " + "  ".join(f"{name} {rate:.0f}" for name, rate in rates.items()),
                  file=sys.stderr)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}" if v < 10 else f"{v:.0f}"))
    print(f"\n{args.model}, {pairs} pairs, batch {args.batch_size} (the last {last}), epochs 2-"
          f"{args.epochs}, torch threads {torch.get_num_threads()}: median static/automatic "
          f"{statistics.median(table['static/automatic']):.2f}, static/eager {statistics.median(table['static/eager']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
