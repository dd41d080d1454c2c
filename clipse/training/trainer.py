"""The trainer: ``train(config, callbacks) -> TrainResult``, a plain function of a typed config.
It knows nothing of Optuna or SLURM; callbacks see every epoch's validation metrics and may stop
the run by returning True (that is how the search prunes), or pause it by returning ``PAUSE``:
the run returns with status ``paused``, its checkpoint written and nothing final (no test
evaluation, result.json or registry row), and ``resume`` continues it (a search trains several
seeds of a trial epoch by epoch this way). Nor does it know any loss's
parameters: it asks the config for the loss and ramps the loss's strength during a warm-up.

The run folder (``clipse.runs.folder``) gets its files as the run goes; checkpoints are written
at the end of every epoch, and ``resume`` continues from the last one and, on the CPU, ends with
exactly the metrics of an uninterrupted run. A finished run appends one row to the registry.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from clipse.config import TrainConfig
from clipse.data.sampling import TopicalBatchSampler, fold_short_tail, random_batches
from clipse.evaluation.encoding import ImageNormalizer, evaluate_split
from clipse.evaluation.zeroshot import ZEROSHOT_KEYS, evaluate_zeroshot
from clipse.losses import MAX_LOGIT_SCALE, STRENGTH_COLUMN, clamp_scale
from clipse.runs import registry
from clipse.runs.folder import RunFolder, TrainResult, default_run_dir
from clipse.trackers import TrackerGroup, open_trackers
from clipse.training.affinity import affinity_source, true_false_negatives
from clipse.training.assembly import (
    autocast_dtype,
    autocast_for,
    dataset_for,
    model_for,
    prepare_model,
    resolve_device,
    split_tensors,
    wants_cuda,
    zeroshot_for,
    zeroshot_set_for,
)
from clipse.training.batches import TrainingBatches
from clipse.training.distributed import Ranks, run_ranks
from clipse.training.embedded import check_model, ensure_built, is_embedded
from clipse.training.global_batch import contrastive_backward
from clipse.util.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class EpochReport:
    """What callbacks see after each epoch (and after the checkpoint is safely written)."""

    epoch: int                       # 1-based
    epochs: int
    metrics: dict[str, float]        # train_loss, val_<metric> for every retrieval metric, seconds
    weight_stats: dict[str, float]   # epoch means of the SANW weight statistics
    run_dir: Path


PAUSE = "pause"
Callback = Callable[[EpochReport], "bool | str | None"]   # True: stop; PAUSE: pause (resumable)


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
    try:  # the fused kernel where this torch build has one
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to 0 (step 0-based)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


def warmup_fraction(config: TrainConfig, epoch_progress: float) -> float:
    """How far the strength warm-up is (1 = full strength) after ``epoch_progress`` epochs."""
    if config.alpha_warmup_epochs <= 0:
        return 1.0
    return min(1.0, epoch_progress / config.alpha_warmup_epochs)


# ----------------------------------------------------------------------------------------------


def zeroshot_due(config: TrainConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` (1-based) measures zero-shot accuracy: every ``--zeroshot-every``
    epochs and the last one, and every epoch when it picks the checkpoint."""
    every = config.zeroshot_every
    return config.select_metric == "val_zs_top1" or epoch == config.epochs or (every > 0 and epoch % every == 0)


def build_embedded_model(config: TrainConfig) -> None:
    """Build the embedded pretrained model ``config`` starts from, if it does and it is missing
    (``clipse.training.embedded``): once, before any run or worker needs it."""
    if is_embedded(config.pretrained):
        check_model(config.pretrained, config.model)
        dataset_for(config)  # a bad data path is one line, not one line after minutes of building
        ensure_built(config.pretrained, train)


def train(config: TrainConfig, callbacks: Iterable[Callback] = ()) -> TrainResult:
    """Train one run as configured; see the module docstring for outputs and resuming."""
    config.validate()
    autocast_dtype(resolve_device(config.device), config.precision)  # one line before anything is written
    build_embedded_model(config)
    zeroshot_set_for(config)  # a bad zero-shot set is one line before the run folder exists
    started = time.perf_counter()
    folder = RunFolder(config.run_dir or default_run_dir())
    finished = folder.start(config)
    if finished is not None:  # its registry row too, in case a crash came between the two
        registry.append_row(Path(config.registry), registry.registry_row(config, finished))
        return finished
    trackers = open_trackers(config, folder)
    try:
        with run_ranks(config.nproc, wants_cuda(config.device)) as ranks:
            ranks.broadcast(config.replace(run_dir=str(folder.path)).to_mapping())  # the other ranks start
            result = train_in_folder(config, list(callbacks), folder, trackers, started, ranks)
    except BaseException as error:
        trackers.abort(error)
        raise
    if result.status == "paused":
        trackers.pause()
    else:
        trackers.finish(result, folder)
    return result


def finish_paused(config: TrainConfig, paused: TrainResult) -> TrainResult:
    """End a paused run where it is, as ``stopped`` (a search pruned it): its result.json and
    registry row are written and its trackers' records closed, as for a run a callback stopped."""
    result = dataclasses.replace(paused, status="stopped")
    folder = RunFolder(config.run_dir)
    folder.save_result(result)
    registry.append_row(Path(config.registry), registry.registry_row(config, result))
    trackers = open_trackers(config, folder)
    trackers.finish(result, folder)
    return result


def train_as_helper(config: TrainConfig, ranks: Ranks) -> None:
    """A rank other than 0 of a data-parallel run: the same steps on its share of every batch;
    it writes nothing (rank 0 keeps the run folder)."""
    train_in_folder(config, [], RunFolder(config.run_dir), TrackerGroup([]), time.perf_counter(), ranks)


def train_in_folder(config: TrainConfig, callbacks: list[Callback], folder: RunFolder, trackers: TrackerGroup,
                    started: float, ranks: Ranks) -> TrainResult | None:
    """``train`` in a run folder it started: every row goes to the folder, then to ``trackers``
    (on rank 0; the other ranks of a data-parallel run only train)."""
    if config.threads:  # the run's threads, shared by its processes
        torch.set_num_threads(max(1, config.threads // ranks.world))
    device = ranks.device(resolve_device(config.device))
    autocast = autocast_for(device, config.precision)
    torch.manual_seed(config.seed)
    loaded = model_for(config)
    dataset = dataset_for(config)
    model = loaded.model.to(device)
    ranks.broadcast_state(model)
    train_data = split_tensors(dataset, "train", loaded).with_shuffled_captions(config.caption_noise, config.seed)
    val_data = split_tensors(dataset, "val", loaded) if ranks.main else None  # rank 0 evaluates
    normalize = ImageNormalizer(loaded.mean, loaded.std, device)
    state = folder.load_last(device) if config.resume else None
    zeroshot = zeroshot_for(config, loaded) if ranks.main else None
    start_metrics = dict(state.get("start_metrics") or {}) if state is not None else {}
    if zeroshot is not None and not start_metrics:  # what the starting model knew, measured once per run
        start_metrics = evaluate_zeroshot(model, zeroshot, normalize, autocast)
    loss_function = config.loss_function()
    loss_function.prepare_model(model)
    source = affinity_source(config.affinity if loss_function.uses_affinity else "online", model, train_data,
                             normalize, autocast, config.ema_decay)  # from the starting model, before any resume
    model = prepare_model(model, config)
    training_batches = TrainingBatches(train_data, normalize, config.augment, config.seed)
    n_pairs = len(train_data.tokens)
    if n_pairs < max(2, ranks.world):
        raise UserError(f"{dataset.name}: the training split has {n_pairs} pair(s); contrastive training needs 2, "
                        "and one per process (--nproc)")
    if config.topical_batching:  # clustered once, by rank 0: every rank draws the same batches
        sampler = ranks.broadcast(TopicalBatchSampler.from_captions(
            train_data.captions, config.batch_size, config.seed, config.topical_clusters or None) if ranks.main else None)
        drawn = sampler.batches
    else:
        drawn = lambda epoch: random_batches(n_pairs, config.batch_size, config.seed, epoch)  # noqa: E731
    batches_for = lambda epoch: fold_short_tail(drawn(epoch), ranks.world)  # noqa: E731  (a pair per process)
    steps_per_epoch = len(batches_for(0))
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    optimizer = build_optimizer(model, config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, config.precision) == torch.float16)
    select_key = config.select_metric

    start_epoch, global_step, prior_seconds = 0, 0, 0.0
    best_value, best_epoch, best_metrics, last_metrics, weight_means = -math.inf, 0, {}, {}, {}
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        source.load_state_dict(state.get("affinity_source"))
        scaler.load_state_dict(state["scaler"])
        start_epoch, global_step, prior_seconds = state["epoch"], state["global_step"], state["seconds"]
        best_value, best_epoch, best_metrics = state["best_value"], state["best_epoch"], state["best_metrics"]
        last_metrics, weight_means = state["last_metrics"], state["weight_stats"]
        if ranks.main:  # quiet inside a search, whose seeds of a trial resume after every epoch
            log.log(logging.INFO if config.progress else logging.DEBUG, "%s: resuming after epoch %d (step %d)",
                    folder.path, start_epoch, global_step)
    if ranks.main:
        repaired_steps, repaired_epoch = folder.rewind(start_epoch, global_step,
                                                       state.get("rows") if state is not None else None)
        trackers.log_steps(repaired_steps)
        if repaired_epoch is not None:
            trackers.log_epoch(repaired_epoch)

    status, diverged_step, epochs_done = "completed", None, start_epoch
    model.train()
    for epoch in range(start_epoch, config.epochs):
        epoch_started = time.perf_counter()
        batches = batches_for(epoch)
        # Summed on the device and read only at logged steps, so that a step never waits for it.
        step_rows, loss_sum = [], torch.zeros((), dtype=torch.float64, device=device)
        stat_sums: dict[str, torch.Tensor] = {}
        stat_steps: dict[str, torch.Tensor] = {}  # steps whose value was a number (NaN: nothing to count)
        first_nonfinite = torch.zeros((), dtype=torch.long, device=device)  # global step of the first, or 0
        window_start, window_samples = time.perf_counter(), 0
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                   disable=not (config.progress and ranks.main), file=sys.stderr)
        for index, batch in enumerate(batches):
            lr = learning_rate(global_step, total_steps, warmup_steps, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = loss_function.ramped(warmup_fraction(config, epoch + (index + 1) / len(batches)))
            logged = (global_step + 1) % config.log_every == 0 or index == len(batches) - 1
            optimizer.zero_grad(set_to_none=True)
            step_batch = training_batches(batch, global_step, ranks)
            loss, stats, scale = contrastive_backward(
                model, step_batch, step_loss, ranks=ranks, micro_batch=config.micro_batch, autocast=autocast,
                with_stats=logged, scale_loss=scaler.scale,
                false_negatives=true_false_negatives(train_data, batch, device) if logged else None,
                reference=source.reference(batch, step_batch, ranks, autocast))
            global_step += 1
            first_nonfinite = torch.where((first_nonfinite == 0) & ~torch.isfinite(loss), global_step,
                                          first_nonfinite)
            ranks.average_gradients(model.parameters())
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            source.after_step(model)
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))
                loss_sum += loss
                for key, value in stats.items():  # 0-d tensors (a loss may give plain numbers too)
                    value = torch.as_tensor(value, device=device, dtype=torch.float64)
                    counted = torch.isfinite(value)
                    stat_sums[key] = stat_sums.get(key, 0.0) + torch.where(counted, value, 0.0)
                    stat_steps[key] = stat_steps.get(key, 0) + counted.long()
            window_samples += len(batch)
            bar.update(1)
            if logged:  # the step's one wait for the device
                nonfinite_at = int(first_nonfinite)
                if nonfinite_at:  # stop there; the steps since trained on nothing worth keeping
                    status, diverged_step = "diverged", nonfinite_at
                    break
                now = time.perf_counter()
                samples_per_s = window_samples / max(now - window_start, 1e-9)
                window_start, window_samples = now, 0
                loss_value = loss.item()
                step_rows.append({
                    "epoch": epoch + 1, "step": global_step, "loss": loss_value,
                    "temperature": 1.0 / float(clamp_scale(scale)), "lr": lr,
                    "grad_norm": float(grad_norm), "samples_per_s": samples_per_s,
                    STRENGTH_COLUMN: step_loss.strength_value, **{key: float(value) for key, value in stats.items()},
                })
                bar.set_postfix(loss=f"{loss_value:.3f}", samples_s=f"{samples_per_s:.0f}", refresh=False)
        bar.close()
        if status == "diverged":
            if ranks.main:
                folder.append_steps(step_rows)
                trackers.log_steps(step_rows)
                log.warning("%s: non-finite loss at step %d; the run stops as diverged", folder.path, diverged_step)
            break
        if not ranks.main:  # rank 0 evaluates, saves and decides whether to go on
            verdict = ranks.broadcast(None)
            if verdict:
                status = verdict
                break
            continue

        train_seconds = time.perf_counter() - epoch_started
        metrics, _ = evaluate_split(model, val_data, normalize, autocast)
        if zeroshot is not None:  # NaN in the epochs --zeroshot-every skips
            metrics.update(evaluate_zeroshot(model, zeroshot, normalize, autocast) if zeroshot_due(config, epoch + 1)
                           else dict.fromkeys(ZEROSHOT_KEYS, math.nan))
        weight_means = {key: float(total) / int(stat_steps[key]) if int(stat_steps[key]) else math.nan
                        for key, total in stat_sums.items()}
        last_metrics = {f"val_{key}": value for key, value in metrics.items()}
        epoch_metrics = {"train_loss": float(loss_sum) / len(batches), **last_metrics,
                         "samples_per_s": n_pairs / train_seconds, "seconds": time.perf_counter() - epoch_started,
                         **weight_means}
        epoch_row = {"epoch": epoch + 1, **epoch_metrics, "trained_by_pid": os.getpid()}
        if last_metrics[select_key] > best_value:
            best_value, best_epoch, best_metrics = last_metrics[select_key], epoch + 1, dict(last_metrics)
            folder.save_best({"state_dict": model.state_dict(), "epoch": epoch + 1, "metrics": best_metrics,
                              "config": config.to_mapping()})
        folder.save_last({
            "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch + 1, "global_step": global_step,
            "seconds": prior_seconds + time.perf_counter() - started,
            "best_value": best_value, "best_epoch": best_epoch, "best_metrics": best_metrics,
            "last_metrics": last_metrics, "weight_stats": weight_means, "config": config.to_mapping(),
            "affinity_source": source.state_dict(), "start_metrics": start_metrics,
            "rows": {"steps": step_rows, "epoch": epoch_row},  # rewritten on resume if the crash beat them
        })
        folder.append_steps(step_rows)  # after the checkpoint: a row announces a saved epoch
        folder.append_epoch(epoch_row)
        trackers.log_steps(step_rows)
        trackers.log_epoch(epoch_row)
        epochs_done = epoch + 1
        if config.progress:
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}  loss {epoch_row['train_loss']:.4f}  "
                       f"{select_key} {last_metrics[select_key]:.4f}  (best {best_value:.4f} @ {best_epoch})  "
                       f"{epoch_row['samples_per_s']:.0f} samples/s  {epoch_row['seconds']:.1f} s"
                       + (f"  zero-shot top-1 {metrics['zs_top1']:.4f}" if math.isfinite(metrics.get("zs_top1", math.nan))
                          else ""), file=sys.stderr)
        report = EpochReport(epoch + 1, config.epochs, epoch_metrics, weight_means, folder.path)
        wishes = [callback(report) for callback in callbacks]
        stop = any(bool(w) and not (isinstance(w, str) and w == PAUSE) for w in wishes)  # a pruner may say np.True_
        verdict = ranks.broadcast("stopped" if stop else "paused" if PAUSE in wishes else None)
        if verdict:
            status = verdict
            break

    if not ranks.main:
        return None
    test_metrics = None
    if config.eval_test and status == "completed" and folder.best_checkpoint.exists():
        test_data = split_tensors(dataset, "test", loaded)
        model.load_state_dict(folder.load_best_weights(device))
        metrics, test_ranks = evaluate_split(model, test_data, normalize, autocast)
        if zeroshot is not None:
            metrics.update(evaluate_zeroshot(model, zeroshot, normalize, autocast))
        test_metrics = {f"test_{key}": value for key, value in metrics.items()}
        folder.save_test_ranks(test_ranks)
    result = TrainResult(
        run_id=folder.run_id(config.study), run_dir=str(folder.path), status=status, epochs_done=epochs_done,
        best_epoch=best_epoch, best_value=best_value, best_metrics=best_metrics, last_metrics=last_metrics,
        weight_stats=weight_means, test_metrics=test_metrics, diverged_step=diverged_step,
        seconds=prior_seconds + time.perf_counter() - started, start_metrics=start_metrics,
    )
    if status != "paused":
        folder.save_result(result)
        registry.append_row(Path(config.registry), registry.registry_row(config, result))
    return result
