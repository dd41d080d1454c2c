"""``python -m clipse.pretrain``: build the embedded pretrained model if it is missing, then say
where it is, how it was made, and how well it retrieves on the fine-tuning data before any
fine-tuning (its zero-shot retrieval on the default data's validation split).

Training builds it on first use anyway (``clipse.training.embedded``); this command builds it
ahead of time (say before submitting SLURM jobs that share ``CLIPSE_CACHE``) and inspects it.
"""

from __future__ import annotations

import argparse
import json
import sys

from clipse.config import TrainConfig
from clipse.evaluation.encoding import ImageNormalizer, evaluate_split
from clipse.evaluation.metrics import metrics_table
from clipse.training import build_embedded_model
from clipse.training.assembly import (
    autocast_for,
    dataset_for,
    model_for,
    resolve_device,
    split_tensors,
)
from clipse.training.embedded import EMBEDDED, describe
from clipse.util.errors import cli_main, configure_logging


def zero_shot(tag: str) -> tuple[dict[str, float], str]:
    """Retrieval of the embedded model on the default fine-tuning data's validation split."""
    config = TrainConfig(pretrained=tag)
    device = resolve_device(config.device)
    loaded = model_for(config)
    dataset = dataset_for(config)
    tensors = split_tensors(dataset, "val", loaded)
    metrics, _ = evaluate_split(loaded.model.to(device), tensors, ImageNormalizer(loaded.mean, loaded.std, device),
                                autocast_for(device))
    return metrics, f"{dataset.name}, val: {len(tensors.images)} images, {len(tensors.tokens)} captions"


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipse.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default=next(iter(EMBEDDED)), choices=tuple(EMBEDDED))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    configure_logging()
    build_embedded_model(TrainConfig(pretrained=args.tag, model=EMBEDDED[args.tag].model))
    about = describe(args.tag)
    metrics, scored_on = zero_shot(args.tag)
    if args.json:
        print(json.dumps({**about, "zero_shot": metrics, "zero_shot_on": scored_on}))
        return 0
    print(f"{about['tag']}: {about['file']}\nrecipe {about['key']}: "
          + ", ".join(f"{key} {value}" for key, value in about["recipe"].items()))
    print(f"pretraining validation R@1 mean {100 * about['pretraining_val_metrics']['val_r1_mean']:.2f}")
    print(f"zero-shot on the fine-tuning data ({scored_on}):")
    print(metrics_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
