"""What the tie-aware ranks change: a run's best checkpoint scored on a split under the tie rule
and under the strict rule of clipse 0.1 (ties counted for the relevant item), side by side, with
the share of queries that have ties at all and the check that every query without a tie scores
the same under both.

    python benchmarks/tie_effect.py RUN_DIR [RUN_DIR ...] [--split val]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clipse.eval_retrieval import checkpoint_config  # noqa: E402
from clipse.evaluation.encoding import ImageNormalizer, encode_split  # noqa: E402
from clipse.evaluation.metrics import (  # noqa: E402
    METRIC_KEYS,
    MP_METRIC_KEYS,
    TiedRanks,
    metrics_from_ranks,
    retrieval_ranks,
)
from clipse.training.assembly import (  # noqa: E402
    autocast_for,
    dataset_for,
    model_for,
    resolve_device,
    split_tensors,
)


def strict(tied: TiedRanks | None) -> TiedRanks | None:
    """The 0.1 rule: rank = 1 + the candidates strictly above; the tied count for the relevant item."""
    return None if tied is None else TiedRanks.untied(tied.higher + 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", default="val", choices=("val", "test"))
    args = parser.parse_args()
    for run in args.runs:
        config = checkpoint_config(run / "best.pt").replace(pretrained=str(run / "best.pt"))
        device = resolve_device(config.device)
        loaded = model_for(config)
        tensors = split_tensors(dataset_for(config), args.split, loaded)
        images, texts = encode_split(loaded.model.to(device), tensors, ImageNormalizer(loaded.mean, loaded.std, device),
                                     autocast_for(device))
        relevant = tensors.truth.every_pair if tensors.truth is not None else None
        ranks = retrieval_ranks(images, texts, tensors.caption_image, relevant, image_content=tensors.image_content,
                                caption_content=tensors.caption_content)
        old = dataclasses.replace(ranks, t2i=strict(ranks.t2i), i2t=strict(ranks.i2t), mp_t2i=strict(ranks.mp_t2i),
                                  mp_i2t=strict(ranks.mp_i2t))
        new_metrics, old_metrics = metrics_from_ranks(ranks), metrics_from_ranks(old)
        print(f"{run} ({args.split}: {ranks.n_images} images, {len(ranks.caption_image)} captions)")
        # mAP@10 is left out: 0.1 took it over topk's places, an arbitrary order of the tied
        keys = [k for k in METRIC_KEYS + MP_METRIC_KEYS if k in new_metrics and not k.endswith("map10")]
        print(f"  {'metric':12} {'strict (0.1)':>12} {'tie-aware':>10} {'difference':>11}")
        for key in keys:
            scale = 1 if key.endswith("_mr") else 100
            print(f"  {key:12} {scale * old_metrics[key]:12.2f} {scale * new_metrics[key]:10.2f} "
                  f"{scale * (new_metrics[key] - old_metrics[key]):+11.2f}")
        for name in ("i2t", "t2i", "mp_i2t", "mp_t2i"):
            tied = getattr(ranks, name)
            if tied is None:
                continue
            has_tie = tied.tied > 1
            untouched = all(np.array_equal(tied.hit_rate(k)[~has_tie], getattr(old, name).hit_rate(k)[~has_tie])
                            for k in (1, 5, 10))
            print(f"  {name}: {100 * has_tie.mean():.1f}% of queries tie with another candidate; the others score "
                  f"{'the same' if untouched else 'DIFFERENTLY'} under both rules")
        print(f"  tie_share (ties with other content): i2t {100 * new_metrics['i2t_tie_share']:.2f}%, "
              f"t2i {100 * new_metrics['t2i_tie_share']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
