"""True false negatives per training batch of the synthetic data, at each ``--shapes-fn-level``.

From the generator's ground truth (which captions truly describe which images) of the default
training split: the expected number of in-batch negative pairs (image i, caption j of another
pair) whose caption truly describes the image, in a random batch of 128 pairs. Exact, from the
truth matrix, and checked against the mean over random batches drawn as the trainer draws them.

    python benchmarks/false_negatives.py [--batch-size 128] [--batches 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from clipse.config import TrainConfig  # noqa: E402
from clipse.data import ShapesSpec, load_caption_dataset  # noqa: E402
from clipse.data.sampling import random_batches  # noqa: E402
from clipse.data.synthetic import SHAPES_FN_LEVELS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200, help="random batches for the check")
    args = parser.parse_args()
    config = TrainConfig()
    b = args.batch_size
    print(f"random batches of {b} pairs from the default training split ({config.shapes_train_images} images, "
          f"5 captions each); {b * (b - 1)} negative pairs per batch")
    print(f"{'level':>8}{'expected true FN / batch':>26}{'share':>8}{'mean over batches':>19}{'images a caption describes':>30}")
    with tempfile.TemporaryDirectory(prefix="clipse-fn-") as tmp:
        for level in SHAPES_FN_LEVELS:
            spec = ShapesSpec(config.shapes_train_images, config.shapes_val_images, config.shapes_test_images,
                              config.data_seed, level)
            dataset = load_caption_dataset("shapes", Path(tmp) / level, shapes=spec)
            split = dataset.split("train")
            truth = dataset.truth("train").describes()          # (C, N)
            n_pairs = len(split.captions)
            per_image = np.bincount(split.caption_image)
            # Sum over ordered pairs (a, b), a != b, of "caption b describes a's image", over all such pairs.
            hits = float((truth.double().sum(0).numpy() * per_image).sum()) - n_pairs
            share = hits / (n_pairs * (n_pairs - 1))
            owner = torch.as_tensor(split.caption_image)
            drawn = []
            for epoch in range(args.batches):
                batch = torch.from_numpy(random_batches(n_pairs, b, 0, epoch)[0])
                mask = truth[batch][:, owner[batch]]
                drawn.append(int(mask.sum()) - b)
            describes = truth.sum(1).double().mean().item()
            print(f"{level:>8}{share * b * (b - 1):26.1f}{share:8.2%}{np.mean(drawn):19.1f}{describes:30.2f}")


if __name__ == "__main__":
    main()
