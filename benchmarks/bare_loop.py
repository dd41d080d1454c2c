"""clipse's trainer against a bare training loop over the same model, batches and decoded data.

The bare loop is what any trainer must do and no more: gather the batch's uint8 images and
tokens, normalise, forward both towers (under the same autocast), plain InfoNCE, backward, a
fused AdamW step. clipse's
trainer adds the learning-rate schedule, gradient clipping, the logit-scale clamp, the SANW
statistics, the rows of training.csv and the progress bar. Both run the same number of epochs
in this process, alternating for ``--rounds`` rounds; throughput is the last epoch's training
samples/s (clipse: ``epochs.csv``, which leaves out validation; the bare loop: its own clock).

    python benchmarks/bare_loop.py                    # default model, data and batch
    python benchmarks/bare_loop.py --loss sanw_debias --log-every 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from clipse.config import TrainConfig  # noqa: E402
from clipse.data.sampling import random_batches  # noqa: E402
from clipse.evaluation.encoding import ImageNormalizer  # noqa: E402
from clipse.losses import weighted_infonce  # noqa: E402
from clipse.training.assembly import (  # noqa: E402
    autocast_for,
    dataset_for,
    model_for,
    resolve_device,
    split_tensors,
)
from clipse.training.trainer import train  # noqa: E402


def bare_loop(config: TrainConfig) -> float:
    """Samples/s of the last epoch of a bare loop over ``config``'s model, data and batches."""
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    autocast = autocast_for(device, config.precision)
    loaded = model_for(config)
    model = loaded.model.to(device).train()
    data = split_tensors(dataset_for(config), "train", loaded)
    normalize = ImageNormalizer(loaded.mean, loaded.std, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    samples_per_s = 0.0
    for epoch in range(config.epochs):
        batches = random_batches(len(data.tokens), config.batch_size, config.seed, epoch)
        started = time.perf_counter()
        for batch in batches:
            pairs = torch.from_numpy(batch)
            images = normalize(data.images[data.caption_image[pairs]])
            tokens = data.tokens[pairs].to(device, non_blocking=True)
            with autocast():
                loss = weighted_infonce(model.encode_image(images, normalize=True).float(),
                                        model.encode_text(tokens, normalize=True).float(), model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples_per_s = sum(len(b) for b in batches) / (time.perf_counter() - started)
    return samples_per_s


def clipse_trainer(config: TrainConfig, workdir: Path, name: str) -> float:
    result = train(config.replace(run_dir=str(workdir / name), registry=str(workdir / "registry.csv")))
    return float(pd.read_csv(Path(result.run_dir) / "epochs.csv")["samples_per_s"].iloc[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="per measurement; the last one is timed")
    parser.add_argument("--loss", default="infonce")
    parser.add_argument("--model", default="clipse-tiny")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=None, help="clipse's --log-every (default: its default)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    settings = {"epochs": args.epochs, "loss": args.loss, "model": args.model, "batch_size": args.batch_size,
                "device": args.device, "progress": False}
    if args.log_every is not None:
        settings["log_every"] = args.log_every
    config = TrainConfig.from_mapping(settings, "benchmark")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        split_tensors(dataset_for(config), "train", model_for(config))  # decode once, before any timing
        for round_ in range(args.rounds):
            trainer = clipse_trainer(config, Path(tmp), f"round-{round_}")
            bare = bare_loop(config)
            rows.append({"round": round_ + 1, "clipse samples/s": trainer, "bare loop samples/s": bare,
                         "ratio": trainer / bare})
            print(f"round {round_ + 1}: clipse {trainer:.0f}  bare {bare:.0f}  ratio {trainer / bare:.3f}",
                  file=sys.stderr)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}" if v < 10 else f"{v:.0f}"))
    print(f"\n{args.model}, {args.loss}, batch {args.batch_size}, device {resolve_device(args.device)}, "
          f"torch threads {torch.get_num_threads()}: median clipse/bare {statistics.median(table['ratio']):.3f} "
          f"(median samples/s {statistics.median(table['clipse samples/s']):.0f} vs "
          f"{statistics.median(table['bare loop samples/s']):.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
