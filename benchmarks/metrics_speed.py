"""Retrieval metrics on 25,000 captions x 5,000 images (a COCO-5k-sized test set): embeddings
of a model that retrieves (no ties) and of a collapsed one (every score tied: the tie rule's
slowest case).

    python benchmarks/metrics_speed.py [--dim 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clipse.evaluation.metrics import retrieval_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(args.images, args.dim, generator=g), dim=1)
    owner = np.repeat(np.arange(args.images), args.captions_per_image)
    texts = torch.nn.functional.normalize(images[owner] + torch.randn(len(owner), args.dim, generator=g), dim=1)
    collapsed = torch.nn.functional.normalize(torch.ones(args.dim), dim=0)
    cases = {"retrieving": (images, texts),
             "collapsed": (collapsed.expand(args.images, -1), collapsed.expand(len(owner), -1))}
    for name, (image_emb, text_emb) in cases.items():
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            metrics = retrieval_metrics(image_emb, text_emb, owner)
            seconds.append(time.perf_counter() - started)
        print(f"{name}: {len(owner)} captions x {args.images} images, dim {args.dim}, {torch.get_num_threads()} "
              f"threads: median {statistics.median(seconds):.2f} s over {args.repeats} (all: "
              f"{', '.join(f'{s:.2f}' for s in seconds)}); r1_mean {metrics['r1_mean']:.4f}, "
              f"tie_share {metrics['tie_share']:.2f}")

if __name__ == "__main__":
    main()
