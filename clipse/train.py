"""``python -m clipse.train``: train one run from the command line (settings: defaults < --config
FILE < flags), or ``train(config)`` from Python (``clipse.training``). With no flags it trains the
embedded default; a torchrun launch makes every rank but 0 serve rank 0.
"""

from __future__ import annotations

import argparse
import math
import sys

from clipse.config import (
    TrainConfig,
    add_config_arguments,
    config_overrides,
    load_config_file,
)
from clipse.evaluation.metrics import METRIC_KEYS, MP_METRIC_KEYS
from clipse.models import list_models
from clipse.runs.folder import TrainResult
from clipse.training import train
from clipse.training.distributed import session_from_environment
from clipse.training.embedded import is_embedded
from clipse.training.helper import serve
from clipse.util.errors import cli_main, configure_logging

__all__ = ["train", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clipse.train",
        description="Train one CLIP run (InfoNCE or SANW). Settings: defaults < --config FILE < flags.")
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (keys as the flags, with _)")
    parser.add_argument("--list-models", action="store_true", help="list model architectures and exit")
    add_config_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    config = load_config_file(args.config) if args.config else TrainConfig()
    return TrainConfig.from_mapping(config_overrides(args), "command line", base=config)


def describe_start(config: TrainConfig) -> str:
    """One line: what the run starts from and trains on."""
    weights = config.pretrained if config.pretrained and config.pretrained.lower() != "none" else None
    start = (f"fine-tuning {config.model} from {weights}" + (" (the embedded pretrained model)" if is_embedded(weights)
                                                              else "")
             if weights else f"training {config.model} from scratch (random init)")
    return (f"{start} with {config.loss} on {config.data} data, {config.epochs} epochs, lr {config.lr:g}"
            + ("; --pretrained none trains from scratch" if is_embedded(weights) else ""))


def format_summary(result: TrainResult, select_key: str) -> str:
    lines = [f"run {result.run_id}: {result.status} after {result.epochs_done} epoch(s) in {result.seconds:.1f} s"]
    if result.status == "diverged":
        lines.append(f"diverged: non-finite loss at step {result.diverged_step}")
    if result.best_metrics:
        lines.append(f"best epoch {result.best_epoch}: {select_key} {result.best_value:.4f}")
        shown = [k for k in (*METRIC_KEYS, "tie_share") if f"val_{k}" in result.best_metrics]  # older runs: no tie_share
        lines.append("  " + "  ".join(f"{k} {result.best_metrics[f'val_{k}']:.4f}" for k in shown))
    if result.best_metrics.get("val_mp_i2t_r1") is not None:
        lines.append("  multi-positive (any truly describing caption or image): " + "  ".join(
            f"{k} {result.best_metrics[f'val_{k}']:.4f}" for k in MP_METRIC_KEYS))
    if result.test_metrics:
        shown = METRIC_KEYS + (MP_METRIC_KEYS if "test_mp_i2t_r1" in result.test_metrics else ())
        lines.append("test (best checkpoint): " + "  ".join(f"{k} {result.test_metrics[f'test_{k}']:.4f}" for k in shown))
    if result.start_metrics:
        after = (result.test_metrics or {}).get("test_zs_top1", result.best_metrics.get("val_zs_top1", math.nan))
        lines.append(f"zero-shot top-1: {result.start_metrics['zs_top1']:.4f} before fine-tuning, " + (
            f"{after:.4f} at the best checkpoint ({100 * (after - result.start_metrics['zs_top1']):+.1f} points)"
            if math.isfinite(after) else "not measured at the best epoch (--zeroshot-every; --eval-test measures it)"))
    lines.append(f"outputs: {result.run_dir}")
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_models:
        print("\n".join(list_models()))
        return 0
    configure_logging()
    config = config_from_args(args)
    with session_from_environment() as session:  # started by torchrun: ranks other than 0 serve rank 0
        if session is not None and not session.ranks.main:
            serve(session.ranks)
            return 0
        if session is not None and config.nproc == 1:
            config = config.replace(nproc=session.ranks.world)
        print(describe_start(config.validate()), flush=True)
        result = train(config)
    print(format_summary(result, config.select_metric))
    return 0 if result.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
