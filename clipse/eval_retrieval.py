"""Retrieval evaluation of a checkpoint (``docs/reference/metrics.md``), with its zero-shot
accuracy where the run measures one (``--zeroshot``), and the public ``retrieval_metrics`` API.

    python -m clipse.eval_retrieval --checkpoint studies/adhoc/runs/<run>/best.pt --split test

A clipse checkpoint carries its run's configuration (model, data); any other checkpoint needs
``--model`` and the data flags. ``--json`` prints one JSON object with the metric keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipse.config import DATA_KEYS, TrainConfig, add_config_arguments, config_overrides
from clipse.evaluation.encoding import ImageNormalizer, evaluate_split
from clipse.evaluation.metrics import (
    METRIC_KEYS,
    TIE_KEYS,
    metrics_table,
    retrieval_metrics,
)
from clipse.evaluation.zeroshot import ZEROSHOT_KEYS, evaluate_zeroshot
from clipse.training.assembly import (
    autocast_for,
    dataset_for,
    model_for,
    resolve_device,
    split_tensors,
    zeroshot_for,
)
from clipse.util.checkpoints import read_checkpoint
from clipse.util.errors import UserError, cli_main, configure_logging

__all__ = ["retrieval_metrics", "evaluate_checkpoint", "main"]

CONFIG_FLAGS = (*DATA_KEYS, "model", "device")


def checkpoint_config(path: Path) -> TrainConfig | None:
    """The run configuration stored in a clipse checkpoint, or None for a foreign checkpoint."""
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        return None
    state = read_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get("config"), dict):
        return TrainConfig.from_mapping(state["config"], f"{path} (stored config)")
    return None


def evaluate_checkpoint(path: Path, split: str, overrides: dict) -> tuple[dict[str, float], dict]:
    """Metrics of the checkpoint's weights on a split, plus a description of what was scored."""
    stored = checkpoint_config(path)
    if stored is None and "model" not in overrides:
        raise UserError(f"{path}: not a clipse checkpoint (no stored configuration); pass --model and the data flags")
    config = TrainConfig.from_mapping(overrides, "command line", base=stored or TrainConfig())
    config = config.replace(pretrained=str(path), lock_image=False, lock_text=False).validate()
    device = resolve_device(config.device)
    loaded = model_for(config)
    dataset = dataset_for(config)
    tensors = split_tensors(dataset, split, loaded)
    zeroshot = zeroshot_for(config, loaded)
    model, normalize, autocast = loaded.model.to(device), ImageNormalizer(loaded.mean, loaded.std, device), \
        autocast_for(device)
    metrics, _ = evaluate_split(model, tensors, normalize, autocast)
    if zeroshot is not None:
        metrics.update(evaluate_zeroshot(model, zeroshot, normalize, autocast))
    about = {"checkpoint": str(path), "split": split, "dataset": dataset.name, "model": config.model,
             "images": len(tensors.images), "captions": len(tensors.tokens), "zeroshot": config.zeroshot_source}
    return metrics, about


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clipse.eval_retrieval",
                                     description="Image-text retrieval metrics of a checkpoint on a split.")
    parser.add_argument("--checkpoint", required=True, type=Path, help="best.pt / last.pt of a run, or any "
                        "OpenCLIP checkpoint (then give --model and the data flags)")
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the metrics (and the tie "
                        "shares: queries tied with a candidate of different content)")
    add_config_arguments(parser, only=CONFIG_FLAGS)
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    metrics, about = evaluate_checkpoint(args.checkpoint, args.split, config_overrides(args))
    if args.json:
        print(json.dumps({key: metrics[key] for key in METRIC_KEYS + TIE_KEYS + ZEROSHOT_KEYS if key in metrics}))
    else:
        print(f"{about['split']} split of {about['dataset']}: {about['images']} images, {about['captions']} captions; "
              f"model {about['model']} from {about['checkpoint']}")
        print(metrics_table(metrics))
        if "zs_top1" in metrics:
            print(f"zero-shot classification ({about['zeroshot']}): top-1 {metrics['zs_top1']:.4f}  "
                  f"top-5 {metrics['zs_top5']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
