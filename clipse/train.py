"""The trainer (SPEC §5): ``train(config, callbacks) -> TrainResult``, a plain function of a typed
config. It knows nothing of Optuna or SLURM; callbacks see every epoch's validation metrics and
may stop the run by returning True (that is how the search prunes).

A run folder holds ``config.yaml``, ``training.csv`` (per logged step), ``epochs.csv`` (per
epoch), ``last.pt`` and ``best.pt`` checkpoints and ``result.json``; a finished run also appends
one row to the registry. Checkpoints are written at the end of every epoch; ``resume`` continues
from the last one and, on the CPU, ends with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from clipse import registry
from clipse.assembly import autocast_for, dataset_for, model_for, resolve_device, split_tensors
from clipse.config import (TrainConfig, add_config_arguments, config_overrides, load_config_file, save_config)
from clipse.errors import UserError, cli_main, configure_logging
from clipse.evaluation import ImageNormalizer, evaluate_split
from clipse.losses import LOSSES, MAX_LOGIT_SCALE, clamp_scale
from clipse.metrics import METRIC_KEYS
from clipse.models import list_models
from clipse.samplers import TopicalBatchSampler, random_batches

log = logging.getLogger(__name__)

DEFAULT_RUNS_DIR = Path("studies") / "adhoc" / "runs"
# Settings that may change when a run is resumed: they do not change what is computed.
RESUME_FREE_KEYS = {"resume", "progress", "threads", "device", "registry", "run_dir", "study", "trial",
                    "eval_test", "log_every"}


@dataclass
class EpochReport:
    """What callbacks see after each epoch (and after the checkpoint is safely written)."""

    epoch: int                       # 1-based
    epochs: int
    metrics: dict[str, float]        # train_loss, val_<metric> for every SPEC §2 metric, seconds
    weight_stats: dict[str, float]   # epoch means of the SANW weight statistics
    run_dir: Path


Callback = Callable[[EpochReport], "bool | None"]


@dataclass
class TrainResult:
    run_id: str
    run_dir: str
    status: str                              # completed | stopped | diverged
    epochs_done: int
    best_epoch: int
    best_value: float                        # of config.select_metric; -inf before any epoch
    best_metrics: dict[str, float]           # validation metrics of the best epoch
    last_metrics: dict[str, float]
    weight_stats: dict[str, float]           # last epoch's means
    test_metrics: dict[str, float] | None = None
    diverged_step: int | None = None
    seconds: float = 0.0

    def save(self, path: Path) -> None:
        _atomic_write_text(path, json.dumps(dataclasses.asdict(self), indent=2, allow_nan=True))

    @classmethod
    def load(cls, path: Path) -> "TrainResult":
        return cls(**json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------
# small file helpers


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _append_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _truncate_csv(path: Path, column: str, keep_up_to: int) -> None:
    """Drop rows written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        rows = [row for row in reader if int(row[column]) <= keep_up_to]
    with open(path.with_name(path.name + ".tmp"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path.with_name(path.name + ".tmp"), path)


# ----------------------------------------------------------------------------------------------
# optimisation pieces


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on gains, biases (all < 2-D parameters) and logit_scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    try:  # the fused kernel is about twice as fast on the CPU for the tiny models
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to 0 (step 0-based)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


def loss_function(config: TrainConfig) -> Callable:
    """``f(image_emb, text_emb, scale, alpha) -> (loss, stats)`` for the configured loss."""
    fn = LOSSES[config.loss]
    if config.loss == "sanw_debias":
        return lambda u, v, s, alpha: fn(u, v, s, alpha=alpha, delta=config.delta, lam=config.lam, rho=config.rho)
    if config.loss == "sanw_bandpass":
        return lambda u, v, s, alpha: fn(u, v, s, alpha=alpha, m1=config.m1, m2=config.m2, gamma=config.gamma,
                                         rho=config.rho)
    return lambda u, v, s, alpha: fn(u, v, s)


def effective_alpha(config: TrainConfig, epoch_progress: float) -> float:
    """Strength warm-up: alpha ramps linearly from 0 over the first ``alpha_warmup_epochs``
    (0 for InfoNCE, which has no strength)."""
    if config.loss == "infonce":
        return 0.0
    if config.alpha_warmup_epochs <= 0:
        return config.alpha
    return config.alpha * min(1.0, epoch_progress / config.alpha_warmup_epochs)


# ----------------------------------------------------------------------------------------------
# the run folder


def default_run_dir() -> Path:
    return DEFAULT_RUNS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def run_id_for(config: TrainConfig, run_dir: Path) -> str:
    return f"{config.study}/{run_dir.name}" if config.study else run_dir.name


def config_differences(config: TrainConfig, run_dir: Path) -> list[str]:
    """Settings that differ from the run folder's saved config (ignoring the resume-free ones)."""
    saved_file = run_dir / "config.yaml"
    if not saved_file.exists():
        return []
    saved = load_config_file(saved_file).to_mapping()
    current = config.to_mapping()
    return [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in current
            if k not in RESUME_FREE_KEYS and saved.get(k) != current[k]]


# ----------------------------------------------------------------------------------------------


def train(config: TrainConfig, callbacks: Iterable[Callback] = ()) -> TrainResult:
    """Train one run as configured; see the module docstring for outputs and resuming."""
    config.validate()
    callbacks = list(callbacks)
    started = time.perf_counter()
    run_dir = Path(config.run_dir) if config.run_dir else default_run_dir()
    run_id = run_id_for(config, run_dir)
    last_path, best_path, result_path = run_dir / "last.pt", run_dir / "best.pt", run_dir / "result.json"
    if not config.resume and (last_path.exists() or result_path.exists()):
        raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --run-dir")
    if config.resume:
        changed = config_differences(config, run_dir)
        if changed:
            raise UserError(f"{run_dir}: cannot resume with a different configuration ({'; '.join(changed)})")
        if result_path.exists():
            finished = TrainResult.load(result_path)
            if finished.status in ("completed", "diverged"):
                return finished
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")

    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    autocast = autocast_for(device)
    torch.manual_seed(config.seed)
    loaded = model_for(config)
    dataset = dataset_for(config)
    model = loaded.model.to(device)
    train_data = split_tensors(dataset, "train", loaded)
    val_data = split_tensors(dataset, "val", loaded)
    normalize = ImageNormalizer(loaded.mean, loaded.std, device)
    n_pairs = len(train_data.tokens)
    if n_pairs < 2:
        raise UserError(f"{dataset.name}: the training split has {n_pairs} pair(s); contrastive training needs 2")

    if config.topical_batching:
        sampler = TopicalBatchSampler.from_captions(train_data.captions, config.batch_size, config.seed,
                                                    config.topical_clusters or None)
        batches_for = sampler.batches
    else:
        batches_for = lambda epoch: random_batches(n_pairs, config.batch_size, config.seed, epoch)  # noqa: E731
    steps_per_epoch = len(batches_for(0))
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    optimizer = build_optimizer(model, config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    compute_loss = loss_function(config)
    select_key = config.select_metric

    start_epoch, global_step, prior_seconds = 0, 0, 0.0
    best_value, best_epoch, best_metrics, last_metrics, weight_means = -math.inf, 0, {}, {}, {}
    if config.resume and last_path.exists():
        state = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, global_step, prior_seconds = state["epoch"], state["global_step"], state["seconds"]
        best_value, best_epoch, best_metrics = state["best_value"], state["best_epoch"], state["best_metrics"]
        last_metrics, weight_means = state["last_metrics"], state["weight_stats"]
        log.info("%s: resuming after epoch %d (step %d)", run_dir, start_epoch, global_step)
    _truncate_csv(run_dir / "training.csv", "step", global_step)
    _truncate_csv(run_dir / "epochs.csv", "epoch", start_epoch)

    status, diverged_step, epochs_done = "completed", None, start_epoch
    model.train()
    for epoch in range(start_epoch, config.epochs):
        epoch_started = time.perf_counter()
        batches = batches_for(epoch)
        step_rows, loss_sum, stat_sums = [], 0.0, {}
        window_start, window_samples = time.perf_counter(), 0
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                   disable=not config.progress, file=sys.stderr)
        for index, batch in enumerate(batches):
            lr = learning_rate(global_step, total_steps, warmup_steps, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            alpha = effective_alpha(config, epoch + (index + 1) / len(batches))
            pairs = torch.from_numpy(batch)
            images = normalize(train_data.images[train_data.caption_image[pairs]])
            tokens = train_data.tokens[pairs].to(device, non_blocking=True)
            with autocast():
                image_emb = model.encode_image(images, normalize=True)
                text_emb = model.encode_text(tokens, normalize=True)
                scale = model.logit_scale.exp()
                loss, stats = compute_loss(image_emb.float(), text_emb.float(), scale.float(), alpha)
            global_step += 1
            if not torch.isfinite(loss):
                status, diverged_step = "diverged", global_step
                break
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))

            loss_value = loss.item()
            loss_sum += loss_value
            for key, value in stats.items():
                stat_sums[key] = stat_sums.get(key, 0.0) + float(value)
            window_samples += len(batch)
            bar.update(1)
            if global_step % config.log_every == 0 or index == len(batches) - 1:
                now = time.perf_counter()
                samples_per_s = window_samples / max(now - window_start, 1e-9)
                window_start, window_samples = now, 0
                step_rows.append({
                    "epoch": epoch + 1, "step": global_step, "loss": loss_value,
                    "temperature": 1.0 / float(clamp_scale(scale.detach())), "lr": lr,
                    "grad_norm": float(grad_norm), "samples_per_s": samples_per_s, "alpha": alpha,
                    **{key: float(value) for key, value in stats.items()},
                })
                bar.set_postfix(loss=f"{loss_value:.3f}", samples_s=f"{samples_per_s:.0f}", refresh=False)
        bar.close()
        if status == "diverged":
            _append_csv(run_dir / "training.csv", step_rows)
            log.warning("%s: non-finite loss at step %d; the run stops as diverged", run_dir, diverged_step)
            break

        train_seconds = time.perf_counter() - epoch_started
        metrics, _ = evaluate_split(model, val_data, normalize, autocast)
        weight_means = {key: total / len(batches) for key, total in stat_sums.items()}
        last_metrics = {f"val_{key}": value for key, value in metrics.items()}
        epoch_row = {"epoch": epoch + 1, "train_loss": loss_sum / len(batches), **last_metrics,
                     "samples_per_s": n_pairs / train_seconds, "seconds": time.perf_counter() - epoch_started,
                     **weight_means}
        _append_csv(run_dir / "training.csv", step_rows)
        _append_csv(run_dir / "epochs.csv", [epoch_row])
        improved = last_metrics[select_key] > best_value
        if improved:
            best_value, best_epoch, best_metrics = last_metrics[select_key], epoch + 1, dict(last_metrics)
            _atomic_torch_save({"state_dict": model.state_dict(), "epoch": epoch + 1, "metrics": best_metrics,
                                "config": config.to_mapping()}, best_path)
        _atomic_torch_save({
            "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch + 1, "global_step": global_step,
            "seconds": prior_seconds + time.perf_counter() - started,
            "best_value": best_value, "best_epoch": best_epoch, "best_metrics": best_metrics,
            "last_metrics": last_metrics, "weight_stats": weight_means, "config": config.to_mapping(),
        }, last_path)
        epochs_done = epoch + 1
        if config.progress:
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}  loss {epoch_row['train_loss']:.4f}  "
                       f"{select_key} {last_metrics[select_key]:.4f}  (best {best_value:.4f} @ {best_epoch})  "
                       f"{epoch_row['samples_per_s']:.0f} samples/s  {epoch_row['seconds']:.1f} s", file=sys.stderr)
        report = EpochReport(epoch + 1, config.epochs, {k: v for k, v in epoch_row.items() if k != "epoch"},
                             weight_means, run_dir)
        if any([bool(callback(report)) for callback in callbacks]):
            status = "stopped"
            break

    test_metrics = None
    if config.eval_test and status == "completed" and best_path.exists():
        test_data = split_tensors(dataset, "test", loaded)
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=False)["state_dict"])
        metrics, ranks = evaluate_split(model, test_data, normalize, autocast)
        test_metrics = {f"test_{key}": value for key, value in metrics.items()}
        np.savez(run_dir / "test_ranks.npz", **dataclasses.asdict(ranks))
    result = TrainResult(
        run_id=run_id, run_dir=str(run_dir), status=status, epochs_done=epochs_done, best_epoch=best_epoch,
        best_value=best_value, best_metrics=best_metrics, last_metrics=last_metrics, weight_stats=weight_means,
        test_metrics=test_metrics, diverged_step=diverged_step,
        seconds=prior_seconds + time.perf_counter() - started,
    )
    result.save(result_path)
    registry.append_row(Path(config.registry), registry_row(config, result))
    return result


def registry_row(config: TrainConfig, result: TrainResult) -> dict:
    params = {k: v for k, v in config.to_mapping().items()
              if k not in RESUME_FREE_KEYS}
    return {
        "run_id": result.run_id, "study": config.study, "trial": config.trial, "status": result.status,
        "loss": config.loss, "params": json.dumps(params, sort_keys=True), "epochs_done": result.epochs_done,
        "best_epoch": result.best_epoch, **result.best_metrics, **(result.test_metrics or {}),
        "duration_s": round(result.seconds, 2), "host": registry.host(), "versions": registry.versions(),
        "git_commit": registry.git_commit(), "run_dir": result.run_dir,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------
# command line


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


def format_summary(result: TrainResult, select_key: str) -> str:
    lines = [f"run {result.run_id}: {result.status} after {result.epochs_done} epoch(s) in {result.seconds:.1f} s"]
    if result.status == "diverged":
        lines.append(f"diverged: non-finite loss at step {result.diverged_step}")
    if result.best_metrics:
        lines.append(f"best epoch {result.best_epoch}: {select_key} {result.best_value:.4f}")
        lines.append("  " + "  ".join(f"{k} {result.best_metrics[f'val_{k}']:.4f}" for k in METRIC_KEYS))
    if result.test_metrics:
        lines.append("test (best checkpoint): " + "  ".join(
            f"{k} {result.test_metrics[f'test_{k}']:.4f}" for k in METRIC_KEYS))
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
    result = train(config)
    print(format_summary(result, config.select_metric))
    return 0 if result.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
