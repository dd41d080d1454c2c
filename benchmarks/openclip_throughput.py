"""clipse's trainer against OpenCLIP's own trainer, side by side in one run.

Both train the same architecture (clipse-tiny-64: 2-layer, width-64 ViT on 64-px images) on
the same synthetic images (as an OpenCLIP CSV for OpenCLIP), with the same batch size, fp32
precision, learning rate and one epoch, alternating clipse / OpenCLIP for ``--rounds`` rounds.
Throughput is the median per-step samples/s after ``--skip`` warm-up steps, as each trainer
logs it (OpenCLIP: its "N/s" log field; clipse: ``training.csv``). OpenCLIP decodes and
transforms JPEGs in DataLoader workers every step; clipse reads decoded uint8 tensors from
its cache (warmed before timing; a first load's decoding is measured by data_cache.py).

    python benchmarks/openclip_throughput.py            # prints a table and the ratio
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
# OpenCLIP's trainer, with the project's architectures registered first (nothing else changes).
OPENCLIP_LAUNCHER = "import sys, clipse.models; from open_clip_train.main import main; main(sys.argv[1:])"


def write_openclip_csv(workdir: Path, train_images: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from clipse.config import TrainConfig
    from clipse.assembly import dataset_for

    dataset = dataset_for(TrainConfig(shapes_train_images=train_images))
    split = dataset.split("train")
    path = workdir / "train.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "title"])
        for caption, row in zip(split.captions, split.caption_image):
            writer.writerow([str(Path(split.image_paths[row]).resolve()), caption])  # OpenCLIP runs elsewhere
    return path


def run_clipse(workdir: Path, name: str, args) -> list[float]:
    run_dir = workdir / name
    command = [sys.executable, "-m", "clipse.train", "--model", args.model, "--shapes-train-images",
               str(args.train_images), "--epochs", "1", "--batch-size", str(args.batch_size), "--lr", "2e-3",
               "--log-every", "1", "--no-progress", "--run-dir", str(run_dir), "--precision", args.precision,
               "--device", args.device,
               "--registry", str(workdir / "registry.csv")]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return pd.read_csv(run_dir / "training.csv")["samples_per_s"].tolist()


def run_openclip(workdir: Path, name: str, csv_path: Path, args) -> list[float]:
    command = [sys.executable, "-c", OPENCLIP_LAUNCHER, "--train-data", str(csv_path), "--dataset-type", "csv",
               "--csv-separator", ",", "--csv-img-key", "filepath", "--csv-caption-key", "title",
               "--model", args.model, "--batch-size", str(args.batch_size), "--epochs", "1", "--lr", "2e-3",
               "--wd", "0.1", "--warmup", "10", "--grad-clip-norm", "1.0", "--precision", args.precision,
               "--workers", str(args.workers), "--log-every-n-steps", "1", "--save-frequency", "0",
               "--logs", str(workdir), "--name", name, "--seed", "0"]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=workdir)
    log = (workdir / name / "out.log").read_text()
    return [float(x) for x in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.]+)/s,", log)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipse-tiny-64")
    parser.add_argument("--train-images", type=int, default=2000, help="5 pairs each: 2000 -> 10k pairs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="OpenCLIP DataLoader workers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "amp_bf16"), help="both trainers' precision")
    parser.add_argument("--device", default="auto", help="clipse's --device (OpenCLIP uses CUDA when it has it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clipse-bench-") as tmp:
        workdir = Path(tmp)
        csv_path = write_openclip_csv(workdir, args.train_images)
        run_clipse(workdir, "warm-cache", args)  # decodes into the tensor cache; not timed
        rows = []
        for round_ in range(args.rounds):
            for trainer in ("clipse", "openclip"):
                name = f"{trainer}-{round_}"
                rates = (run_clipse(workdir, name, args) if trainer == "clipse"
                         else run_openclip(workdir, name, csv_path, args))
                rows.append((trainer, round_, statistics.median(rates[args.skip:]), len(rates)))
                print(f"{trainer:9} round {round_}: {rows[-1][2]:8.1f} samples/s (median of {len(rates) - args.skip} steps)",
                      flush=True)
    clipse_rate = statistics.median(r[2] for r in rows if r[0] == "clipse")
    openclip_rate = statistics.median(r[2] for r in rows if r[0] == "openclip")
    print(f"\nmodel {args.model}, {args.train_images * 5} pairs, batch {args.batch_size}, {args.precision}, CPU threads "
          f"{os.cpu_count()}, OpenCLIP workers {args.workers}")
    print(f"clipse   {clipse_rate:8.1f} samples/s")
    print(f"OpenCLIP {openclip_rate:8.1f} samples/s")
    print(f"ratio clipse / OpenCLIP: {clipse_rate / openclip_rate:.2f}x")


if __name__ == "__main__":
    main()
