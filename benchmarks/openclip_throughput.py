"""clipse's trainer against OpenCLIP's own trainer, side by side in one run.

Both train the same architecture (clipse-tiny-64: 2-layer, width-64 ViT on 64-px images) on
the same JPEG files (a Flickr8k folder for clipse, an OpenCLIP CSV of the same files for
OpenCLIP), with the same batch size, fp32 precision, learning rate and one epoch, alternating
clipse / OpenCLIP for ``--rounds`` rounds.

The files are the synthetic training images, stored at each of ``--source-sizes``: 64x64 is
the generator's own size, so decoding costs almost nothing; 500x375 is the size of a typical
Flickr8k photo, so each decode costs what it does on the real data (somewhat less, since
enlarged drawings compress better than photographs, which favours OpenCLIP). OpenCLIP decodes
and transforms every image in its DataLoader workers at every step; clipse decodes each file
once into its tensor cache (warmed before timing; the first load is timed by data_cache.py).

Throughput is the samples trained after ``--skip`` warm-up steps divided by the time they took,
from what each trainer logs: OpenCLIP per step (its "N/s" log field, logging every step);
clipse per row of ``training.csv``, at its default ``--log-every`` (a row's rate covers the
steps since the last row, and only those rows read the device, so asking for a row every step
would time a configuration nobody trains with; ``--clipse-log-every`` changes it). Only full
batches are timed: OpenCLIP's trainer drops the epoch's last, smaller batch, and clipse's row
that holds it is left out (a compiled model recompiles for the new shape there). Both are
steady-state figures: clipse's cache is filled before timing. ``--compile`` adds a compiled
pair to the rotation, clipse with ``--compile`` and OpenCLIP with ``--torchcompile``, and their
ratio; their warm-up steps include compiling.

    pip install -e '.[bench]'                            # OpenCLIP's trainer needs these
    python benchmarks/openclip_throughput.py            # prints a table and the ratios
    python benchmarks/openclip_throughput.py --out throughput.csv   # the table as a CSV too
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from clipse.config import TrainConfig  # noqa: E402
from clipse.data.formats.flickr8k import FLICKR8K_TOKEN_FILE  # noqa: E402
from clipse.data.sampling import random_batches  # noqa: E402
from clipse.data.synthetic import CANVAS  # noqa: E402
from clipse.training.assembly import dataset_for  # noqa: E402

# OpenCLIP's trainer, with the project's architectures registered first (nothing else changes).
OPENCLIP_LAUNCHER = "import sys, clipse.models; from open_clip_train.main import main; main(sys.argv[1:])"
NATIVE = f"{CANVAS}x{CANVAS}"
EAGER = ("clipse", "OpenCLIP")                                # (clipse, OpenCLIP) at equal settings
COMPILED = ("clipse --compile", "OpenCLIP --torchcompile")


def size_of(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def source_folder(workdir: Path, train_images: int, size: str) -> tuple[Path, Path, int]:
    """A Flickr8k folder of the synthetic dataset with its images stored at ``size``, an
    OpenCLIP CSV of its training pairs, and how many pairs it holds."""
    dataset = dataset_for(TrainConfig(shapes_train_images=train_images, shapes_val_images=50, shapes_test_images=50))
    split = dataset.split("train")
    generated = Path(split.image_paths[0]).resolve().parent.parent
    folder = workdir / f"flickr8k-{size}"
    shutil.copytree(generated / "Flickr8k_text", folder / "Flickr8k_text")
    (folder / "Flicker8k_Dataset").mkdir(parents=True)
    names = {line.split("#")[0] for line in (folder / "Flickr8k_text" / FLICKR8K_TOKEN_FILE).read_text().splitlines()}
    for name in sorted(names):
        with Image.open(generated / "Flicker8k_Dataset" / name) as image:
            image = image if size == NATIVE else image.resize(size_of(size), Image.Resampling.BICUBIC)
            image.save(folder / "Flicker8k_Dataset" / name, quality=95)
    csv_path = workdir / f"train-{size}.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "title"])
        for caption, row in zip(split.captions, split.caption_image):
            writer.writerow([str(folder / "Flicker8k_Dataset" / Path(split.image_paths[row]).name), caption])
    return folder, csv_path, len(split.captions)


def full_batch_steps(pair_count: int, batch_size: int) -> int:
    """Steps of an epoch before its first batch of another size, by clipse's own batching (the
    last batch is smaller, or one pair larger when a single pair is folded into it)."""
    sizes = [len(batch) for batch in random_batches(pair_count, batch_size, 0, 0)]
    return next((step for step, size in enumerate(sizes) if size != batch_size), len(sizes))


def run_clipse(workdir: Path, name: str, folder: Path, full_steps: int, args, compiled: bool = False) -> list[tuple[float, int]]:
    """The timed pieces of one clipse run. Its epoch ends with a batch of another size (OpenCLIP's
    trainer drops it), which a compiled model recompiles for: the row that holds it is left out."""
    run_dir = workdir / name
    command = [sys.executable, "-m", "clipse.train", *(["--compile"] if compiled else []), "--data", "flickr8k",
               "--data-root", str(folder),
               "--model", args.model, "--epochs", "1", "--batch-size", str(args.batch_size), "--lr", "2e-3",
               "--log-every", str(args.clipse_log_every), "--no-progress", "--run-dir", str(run_dir),
               "--precision", args.precision, "--device", args.device, "--registry", str(workdir / "registry.csv")]
    run(command, ROOT)
    rows = pd.read_csv(run_dir / "training.csv")
    steps = rows["step"] - rows["step"].shift(fill_value=0)  # a row's rate covers the steps since the previous row
    timed = (rows["step"] - steps >= args.skip) & (rows["step"] <= full_steps)  # full batches after the warm-up
    return list(zip(rows.loc[timed, "samples_per_s"], steps[timed]))


def run_openclip(workdir: Path, name: str, csv_path: Path, args, compiled: bool = False) -> list[tuple[float, int]]:
    command = [sys.executable, "-c", OPENCLIP_LAUNCHER, *(["--torchcompile"] if compiled else []),
               "--train-data", str(csv_path), "--dataset-type", "csv",
               "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "title",
               "--model", args.model, "--batch-size", str(args.batch_size), "--epochs", "1", "--lr", "2e-3",
               "--wd", "0.1", "--warmup", "10", "--grad-clip-norm", "1.0", "--precision", args.precision,
               "--workers", str(args.workers), "--log-every-n-steps", "1", "--save-frequency", "0",
               "--logs", str(workdir), "--name", name, "--seed", "0"]
    run(command, workdir)
    log = (workdir / name / "out.log").read_text()
    return [(float(x), 1) for x in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.]+)/s,", log)][args.skip:]


def run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} ... failed (exit {done.returncode}):\n{done.stderr[-2000:]}")


def overall_rate(rates: list[tuple[float, int]]) -> float:
    """Samples over seconds of (samples/s, steps) pieces of equal-sized batches: the steps'
    weighted harmonic mean."""
    return sum(steps for _, steps in rates) / sum(steps / rate for rate, steps in rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipse-tiny-64")
    parser.add_argument("--train-images", type=int, default=2000, help="5 pairs each: 2000 -> 10k pairs")
    parser.add_argument("--source-sizes", default=f"{NATIVE},500x375",
                        help="comma-separated WIDTHxHEIGHT sizes the JPEG files are stored at")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="OpenCLIP DataLoader workers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the timing")
    parser.add_argument("--clipse-log-every", type=int, default=TrainConfig.log_every,
                        help="clipse's --log-every (default: its default)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "amp_bf16"), help="both trainers' precision")
    parser.add_argument("--device", default="auto", help="clipse's --device (OpenCLIP uses CUDA when it has it)")
    parser.add_argument("--compile", action="store_true",
                        help="also time clipse with --compile against OpenCLIP with --torchcompile")
    parser.add_argument("--out", type=Path, help="also write the table to this CSV file")
    args = parser.parse_args()
    try:
        import open_clip_train.main  # noqa: F401
    except ImportError as error:
        sys.exit(f"OpenCLIP's trainer cannot be imported ({error}): pip install -e '.[bench]'")
    sizes = args.source_sizes.split(",")
    matchups = [EAGER, *([COMPILED] if args.compile else [])]
    trainers = [trainer for matchup in matchups for trainer in matchup]
    results = []
    with tempfile.TemporaryDirectory(prefix="clipse-bench-") as tmp:
        workdir = Path(tmp)
        for size in sizes:
            folder, csv_path, pair_count = source_folder(workdir, args.train_images, size)
            full_steps = full_batch_steps(pair_count, args.batch_size)
            run_clipse(workdir, f"warm-cache-{size}", folder, full_steps, args)  # decodes into the tensor cache; not timed
            round_rates = {trainer: [] for trainer in trainers}
            for round_ in range(args.rounds):
                for trainer in trainers:
                    name = f"{trainer.replace(' --', '-')}-{size}-{round_}"
                    compiled = trainer in COMPILED
                    pieces = (run_openclip(workdir, name, csv_path, args, compiled) if trainer.startswith("OpenCLIP")
                              else run_clipse(workdir, name, folder, full_steps, args, compiled))
                    if not pieces:
                        sys.exit(f"{trainer}: no step after the {args.skip} warm-up steps was timed; use more "
                                 "--train-images or a smaller --skip, --clipse-log-every or --batch-size")
                    round_rates[trainer].append(overall_rate(pieces))
                    print(f"source {size:>8}  {trainer:23} round {round_}: {round_rates[trainer][-1]:8.1f} samples/s "
                          f"({sum(steps for _, steps in pieces)} steps)", flush=True)
            rate = {trainer: statistics.median(values) for trainer, values in round_rates.items()}
            row = {"source images": size, **{f"{t} samples/s": round(r, 1) for t, r in rate.items()}}
            for ours, theirs in matchups:
                row[f"{ours} / {theirs}"] = round(rate[ours] / rate[theirs], 2)
            results.append(row)
    print(f"\nmodel {args.model}, {pair_count} pairs, batch {args.batch_size}, {args.precision}, CPU threads "
          f"{os.cpu_count()}, OpenCLIP workers {args.workers}, clipse --log-every {args.clipse_log_every}, "
          f"medians of {args.rounds} rounds, steady state (clipse's cache filled before timing)")
    table = pd.DataFrame(results)
    print(table.to_string(index=False))
    if args.out is not None:
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
