"""The trainer: outputs, determinism, resume after a kill, divergence, callbacks, schedule."""

import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from clipse.config import TrainConfig
from clipse.data.sampling import TopicalBatchSampler
from clipse.eval_retrieval import evaluate_checkpoint
from clipse.evaluation.metrics import METRIC_KEYS, MP_METRIC_KEYS, TIE_KEYS
from clipse.evaluation.zeroshot import ZEROSHOT_KEYS
from clipse.runs.folder import RunFolder
from clipse.train import main as train_main
from clipse.training import trainer as train_module
from clipse.training.trainer import build_optimizer, learning_rate, train
from clipse.util.errors import UserError

TIMING_COLUMNS = ["seconds", "samples_per_s", "trained_by_pid"]  # all that may differ between identical runs


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_folder_outputs(tiny):
    config = tiny(loss="sanw_bandpass", alpha=0.5, log_every=2)
    result = train(config)
    run = Path(config.run_dir)
    assert result.status == "completed" and result.epochs_done == 2
    for name in ("config.yaml", "training.csv", "epochs.csv", "last.pt", "best.pt", "result.json"):
        assert (run / name).is_file(), name
    steps = read_csv(run / "training.csv")
    assert {"epoch", "step", "loss", "temperature", "lr", "grad_norm", "samples_per_s", "weight_mean",
            "weight_std", "weight_min", "weight_max", "share_suppressed", "share_emphasised",
            "band_coverage", "affinity_mean"} <= set(steps[0])
    assert [int(r["step"]) for r in steps] == sorted({*range(2, 1 + 2 * 15, 2), 15, 30})  # every 2nd + epoch ends
    epochs = read_csv(run / "epochs.csv")
    assert [int(r["epoch"]) for r in epochs] == [1, 2]
    assert {"train_loss", "seconds", *(f"val_{k}" for k in METRIC_KEYS + TIE_KEYS)} <= set(epochs[0])
    assert float(epochs[-1]["val_tie_share"]) == 0.0  # a model that trained ties nothing but identical captions
    registry = read_csv(config.registry)
    assert len(registry) == 1 and registry[0]["status"] == "completed" and registry[0]["loss"] == "sanw_bandpass"
    assert float(registry[0]["val_r1_mean"]) == pytest.approx(result.best_metrics["val_r1_mean"])
    assert 0.0 <= result.best_value <= 1.0
    # the SANW statistics are real: with alpha 0.5 the weights are not all 1
    assert float(steps[-1]["weight_std"]) > 0


def test_two_runs_are_identical_on_cpu(tiny, tmp_path):
    first = train(tiny(run_dir=str(tmp_path / "a"), loss="sanw_debias", topical_batching=True))
    second = train(tiny(run_dir=str(tmp_path / "b"), loss="sanw_debias", topical_batching=True))
    a = pd.read_csv(Path(first.run_dir) / "epochs.csv").drop(columns=TIMING_COLUMNS)
    b = pd.read_csv(Path(second.run_dir) / "epochs.csv").drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    third = train(tiny(run_dir=str(tmp_path / "c"), loss="sanw_debias", topical_batching=True, seed=1))
    c = pd.read_csv(Path(third.run_dir) / "epochs.csv").drop(columns=TIMING_COLUMNS)
    assert not a.equals(c)


@pytest.mark.recovery
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    """SIGKILL during epoch 2, restart with --resume: same final metrics as an uninterrupted run."""
    args = ["--pretrained", "none", "--shapes-train-images", "240", "--shapes-val-images", "12", "--shapes-test-images", "12",
            "--epochs", "4", "--batch-size", "16", "--no-progress", "--threads", "1",
            "--data-root", str(tmp_path / "shapes"), "--registry", str(tmp_path / "registry.csv")]
    command = [sys.executable, "-m", "clipse.train", *args]
    assert train_main(args + ["--run-dir", str(tmp_path / "clean")]) == 0  # in this process: the same code

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(command + ["--run-dir", str(killed_dir)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    epochs_file = killed_dir / "epochs.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (epochs_file.exists() and len(read_csv(epochs_file)) >= 1):
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(read_csv(epochs_file))
    assert 1 <= done_before < 4, "the kill should land before the run finished"
    assert not (killed_dir / "result.json").exists()

    resumed = subprocess.Popen(command + ["--run-dir", str(killed_dir), "--resume"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err
    # the resumed process trained only the epochs after the checkpoint: a resume, not a restart
    trained_by = pd.read_csv(epochs_file)["trained_by_pid"].tolist()
    from_checkpoint = trained_by.count(process.pid)
    assert trained_by == [process.pid] * from_checkpoint + [resumed.pid] * (4 - from_checkpoint)
    assert done_before <= from_checkpoint < 4
    a = pd.read_csv(tmp_path / "clean" / "epochs.csv").drop(columns=TIMING_COLUMNS)
    b = pd.read_csv(epochs_file).drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(a, b, check_exact=True)  # no repeated or missing epoch, same numbers
    steps = pd.read_csv(killed_dir / "training.csv")
    assert steps["step"].is_unique and steps["step"].is_monotonic_increasing
    clean_steps = pd.read_csv(tmp_path / "clean" / "training.csv")
    pd.testing.assert_series_equal(steps["loss"], clean_steps["loss"], check_exact=True)


def test_the_checkpoint_is_written_before_the_rows_that_announce_it(tiny, monkeypatch):
    seen = []
    original = RunFolder.append_epoch

    def checking(folder, row):
        seen.append((row["epoch"], torch.load(folder.last_checkpoint, weights_only=True)["epoch"]))
        original(folder, row)

    monkeypatch.setattr(RunFolder, "append_epoch", checking)
    train(tiny(epochs=3))
    assert seen == [(1, 1), (2, 2), (3, 3)]


class CrashAfterCheckpoint(Exception):
    pass


def test_a_crash_between_checkpoint_and_rows_is_repaired_on_resume(tiny, tmp_path, monkeypatch):
    clean = train(tiny(epochs=3, run_dir=str(tmp_path / "clean")))
    original = RunFolder.append_steps

    def crash_in_epoch_2(folder, rows):
        if rows and rows[0]["epoch"] == 2:
            raise CrashAfterCheckpoint
        original(folder, rows)

    monkeypatch.setattr(RunFolder, "append_steps", crash_in_epoch_2)
    config = tiny(epochs=3)
    with pytest.raises(CrashAfterCheckpoint):
        train(config)
    assert len(read_csv(Path(config.run_dir) / "epochs.csv")) == 1  # epoch 2 saved, its rows not written
    monkeypatch.setattr(RunFolder, "append_steps", original)
    train(config.replace(resume=True))
    for name in ("epochs.csv", "training.csv"):
        a = pd.read_csv(Path(clean.run_dir) / name).drop(columns=TIMING_COLUMNS, errors="ignore")
        b = pd.read_csv(Path(config.run_dir) / name).drop(columns=TIMING_COLUMNS, errors="ignore")
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_a_crash_between_result_and_registry_row_is_repaired_on_resume(tiny, monkeypatch):
    from clipse.runs import registry

    config = tiny(epochs=1)
    original = registry.append_row
    monkeypatch.setattr(registry, "append_row", lambda path, row: (_ for _ in ()).throw(CrashAfterCheckpoint()))
    with pytest.raises(CrashAfterCheckpoint):
        train(config)
    assert (Path(config.run_dir) / "result.json").exists() and not Path(config.registry).exists()
    monkeypatch.setattr(registry, "append_row", original)
    for _ in range(2):  # the first resume writes the missing row, the second adds no duplicate
        assert train(config.replace(resume=True)).status == "completed"
    rows = read_csv(Path(config.registry))
    assert len(rows) == 1 and rows[0]["status"] == "completed" and rows[0]["run_dir"] == config.run_dir


def test_a_checkpoint_from_before_pending_rows_still_resumes(tiny):
    """Checkpoints written by an earlier clipse have no "rows": resuming one must work."""
    config = tiny(epochs=3)
    train(config.replace(epochs=2))
    last = Path(config.run_dir) / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["rows"]
    torch.save(state, last)
    (Path(config.run_dir) / "result.json").unlink()
    (Path(config.run_dir) / "config.yaml").write_text((Path(config.run_dir) / "config.yaml").read_text()
                                                     .replace("epochs: 2", "epochs: 3"))
    result = train(config.replace(resume=True))
    assert result.status == "completed" and result.epochs_done == 3
    assert [int(r["epoch"]) for r in read_csv(Path(config.run_dir) / "epochs.csv")] == [1, 2, 3]


def test_resume_refuses_changed_settings_and_reuses_finished_run(tiny):
    config = tiny()
    first = train(config)
    with pytest.raises(UserError, match="already holds a run"):
        train(config)
    with pytest.raises(UserError, match=r"cannot resume with a different configuration \(lr"):
        train(config.replace(resume=True, lr=0.5))
    again = train(config.replace(resume=True, progress=True))
    # as JSON, where NaN equals NaN (fn_precision is NaN when a run suppresses no negative)
    assert json.dumps(dataclasses.asdict(again)) == json.dumps(dataclasses.asdict(first))
    assert len(read_csv(config.registry)) == 1  # nothing trained, no new registry row


def test_non_finite_loss_ends_as_diverged(tiny, diverging_loss):
    config = tiny(loss="diverges", diverge_at=5, log_every=1)
    result = train(config)
    assert result.status == "diverged" and result.diverged_step == 5 and result.epochs_done == 0
    assert read_csv(config.registry)[0]["status"] == "diverged"
    assert all(math.isfinite(float(r["loss"])) for r in read_csv(Path(config.run_dir) / "training.csv"))


def test_a_diverged_run_exits_with_status_1(tmp_path, diverging_loss, capsys):
    code = train_main(["--loss", "diverges", "--diverge-at", "5", "--pretrained", "none", "--shapes-train-images", "48", "--shapes-val-images",
                       "12", "--shapes-test-images", "12", "--batch-size", "16", "--no-progress", "--run-dir",
                       str(tmp_path / "run"), "--registry", str(tmp_path / "r.csv"), "--data-root",
                       str(tmp_path / "shapes")])
    assert code == 1 and "diverged: non-finite loss at step 5" in capsys.readouterr().out


def test_callbacks_see_epochs_and_can_stop(tiny):
    seen = []

    def stop_after_first(report):
        seen.append((report.epoch, report.metrics["val_r1_mean"], dict(report.weight_stats)))
        return report.epoch == 1

    result = train(tiny(epochs=3), [stop_after_first])
    assert result.status == "stopped" and result.epochs_done == 1 and [s[0] for s in seen] == [1]
    assert "weight_mean" in seen[0][2]


def test_eval_test_scores_the_best_checkpoint_on_the_test_split(tiny):
    """The test metrics are the best checkpoint's on the test split (20 images, not the 12 of validation)."""
    config = tiny(eval_test=True, shapes_test_images=20)
    result = train(config)
    ranks = RunFolder(config.run_dir).test_ranks()
    assert ranks.n_images == 20 and len(ranks.caption_image) == 100
    metrics, about = evaluate_checkpoint(Path(config.run_dir) / "best.pt", "test", {})
    assert about["images"] == 20
    assert result.test_metrics == {f"test_{key}": value for key, value in metrics.items()}


def test_the_learning_rate_warms_up_from_the_first_step(tiny):
    """One warm-up epoch of 15 steps: the first step trains at 1/15 of the peak, rising linearly to it."""
    config = tiny(log_every=1, lr=1e-3, warmup_epochs=1.0)
    train(config)
    lrs = [float(row["lr"]) for row in read_csv(Path(config.run_dir) / "training.csv")]
    assert len(lrs) == 30
    assert lrs[:15] == pytest.approx([1e-3 * (step + 1) / 15 for step in range(15)], rel=1e-12)
    assert all(a > b for a, b in zip(lrs[15:], lrs[16:]))  # then the cosine decay


def test_eval_test_writes_ranks(tiny):
    config = tiny(eval_test=True)
    result = train(config)
    # the generated data knows its true matches: the multi-positive recalls come too
    # and the zero-shot accuracy of the synthetic data's set (on by default there)
    assert set(result.test_metrics) == {f"test_{k}" for k in METRIC_KEYS + TIE_KEYS + MP_METRIC_KEYS + ZEROSHOT_KEYS}
    assert (Path(config.run_dir) / "test_ranks.npz").is_file()


def test_the_trainer_trains_on_topical_batches(tiny, tmp_path, monkeypatch):
    served, random_calls = [], []
    original_topical, original_random = TopicalBatchSampler.batches, train_module.random_batches
    monkeypatch.setattr(TopicalBatchSampler, "batches",
                        lambda self, epoch: served.append(epoch) or original_topical(self, epoch))
    monkeypatch.setattr(train_module, "random_batches",
                        lambda *args: random_calls.append(args) or original_random(*args))
    topical = train(tiny(topical_batching=True, epochs=2, run_dir=str(tmp_path / "topical")))
    assert set(served) == {0, 1} and not random_calls
    plain = train(tiny(epochs=2, run_dir=str(tmp_path / "plain")))
    assert random_calls
    losses = [pd.read_csv(Path(r.run_dir) / "training.csv")["loss"] for r in (topical, plain)]
    assert not losses[0].equals(losses[1])


def test_alpha_warmup_ramps_strength(tiny):
    config = tiny(loss="sanw_debias", alpha=0.5, alpha_warmup_epochs=2.0, epochs=2, log_every=1)
    train(config)
    alphas = [float(r["alpha"]) for r in read_csv(Path(config.run_dir) / "training.csv")]
    assert alphas[0] == pytest.approx(0.5 / 30) and alphas[-1] == pytest.approx(0.5)
    assert alphas == sorted(alphas)


def test_learning_rate_schedule():
    lrs = [learning_rate(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5, abs=0.02)
    assert lrs[-1] < 0.001 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_no_weight_decay_on_gains_biases_and_logit_scale():
    from clipse.models import create_model
    model = create_model("clipse-tiny").model
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.2), torch.device("cpu"))
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    for name, param in model.named_parameters():
        expect = param.ndim >= 2 and name != "logit_scale"
        assert (id(param) in decayed) == expect, name
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("tower,prefix,other", [("lock_image", "visual.", "transformer."),
                                                 ("lock_text", "transformer.", "visual.")])
def test_a_locked_tower_is_not_trained_and_the_other_is(tiny, tower, prefix, other):
    config = tiny(epochs=1, **{tower: True})
    from clipse.models import create_model
    torch.manual_seed(config.seed)  # the trainer seeds, then creates the model
    before = create_model("clipse-tiny", init_temperature=config.init_temperature).model.state_dict()
    train(config)
    after = torch.load(Path(config.run_dir) / "last.pt", weights_only=True)["state_dict"]
    locked = [key for key in before if key.startswith(prefix)]
    trained = [key for key in before if key.startswith(other)]
    assert locked and trained
    assert all(torch.equal(after[key], before[key]) for key in locked)
    assert not all(torch.equal(after[key], before[key]) for key in trained)


def test_the_logit_scale_stays_clamped_at_100(tiny):
    """A temperature of 0.001 (scale 1000) starts far above the clamp; training holds it at ln 100."""
    config = tiny(epochs=1, init_temperature=0.001)
    train(config)
    scale = torch.load(Path(config.run_dir) / "last.pt", weights_only=True)["state_dict"]["logit_scale"]
    assert scale.item() <= math.log(100) + 1e-6
    temperatures = pd.read_csv(Path(config.run_dir) / "training.csv")["temperature"]
    assert (temperatures >= 0.01 - 1e-9).all()


def test_gradients_are_clipped_to_grad_clip(tiny):
    norms = []

    def measure(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(measure)
    try:
        config = tiny(epochs=1, grad_clip=0.05)
        train(config)
    finally:
        handle.remove()
    logged = pd.read_csv(Path(config.run_dir) / "training.csv")["grad_norm"]  # before clipping
    assert norms and max(norms) <= 0.05 * (1 + 1e-4)
    assert logged.max() > 0.05  # so clipping had something to do


def test_invalid_configuration_is_a_user_error(tiny):
    with pytest.raises(UserError, match="m1=0.9, m2=0.8: the band needs m1 < m2"):
        train(tiny(loss="sanw_bandpass", m1=0.9, m2=0.8))
    with pytest.raises(UserError, match="alpha=1.5: SANW-Debias needs 0 <= alpha < 1"):
        train(tiny(loss="sanw_debias", alpha=1.5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_training(tiny):
    result = train(tiny(device="cuda", loss="sanw_bandpass"))
    assert result.status == "completed" and math.isfinite(result.best_value)


def host_reads_during(run) -> int:
    """How often ``run()`` reads a tensor's value on the host (the reads that wait for a GPU)."""
    counts = [0]
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "__float__", "__int__", "__bool__", "tolist")}

    def counting(original):
        def wrapper(self, *args, **kwargs):
            counts[0] += 1
            return original(self, *args, **kwargs)
        return wrapper

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(original))
        run()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return counts[0]


@pytest.mark.parametrize("loss", ["infonce", "sanw_debias"])
def test_a_training_step_does_not_read_the_device(tiny, loss):
    """Between rows of training.csv a step reads nothing back: twice the steps (half the batch),
    the same reads."""
    def reads(batch_size):
        config = tiny(loss=loss, epochs=1, batch_size=batch_size, log_every=10_000, run_dir=None)
        return host_reads_during(lambda: train(config.replace(run_dir=str(Path(config.registry).parent / f"b{batch_size}"))))

    assert reads(16) == reads(8)


def test_statistics_summed_on_the_device_give_the_epoch_means_of_every_step(tiny):
    """SANW statistics and the loss are summed at every step whatever --log-every is."""
    every = train(tiny(loss="sanw_debias", alpha=0.5, log_every=1, run_dir=str(Path(tiny().registry).parent / "a")))
    sparse = train(tiny(loss="sanw_debias", alpha=0.5, log_every=7, run_dir=str(Path(tiny().registry).parent / "b")))
    rows = [read_csv(Path(r.run_dir) / "epochs.csv") for r in (every, sparse)]
    for a, b in zip(*rows):
        for key in ("train_loss", "weight_std", "weight_mean", "share_suppressed"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6)
    steps = read_csv(Path(every.run_dir) / "training.csv")
    assert float(rows[0][0]["weight_std"]) == pytest.approx(
        sum(float(r["weight_std"]) for r in steps if r["epoch"] == "1") / sum(r["epoch"] == "1" for r in steps), rel=1e-5)
    assert [int(r["step"]) for r in read_csv(Path(sparse.run_dir) / "training.csv")] == [7, 14, 15, 21, 28, 30]


def test_a_non_finite_loss_between_rows_is_found_with_its_step(tiny, diverging_loss):
    """With rows every 3 steps, a NaN at step 5 is noticed at step 6 and reported as step 5;
    no row from step 5 on is written."""
    result = train(tiny(loss="diverges", diverge_at=5, log_every=3))
    assert result.status == "diverged" and result.diverged_step == 5
    assert [int(r["step"]) for r in read_csv(Path(result.run_dir) / "training.csv")] == [3]
