"""The run folder's own rules, without training: what may start where, resuming, rows repaired
after a crash, atomic files, and round trips of what it stores."""

import re

import pytest
import torch

from clipse.config import TrainConfig
from clipse.evaluation.metrics import metrics_from_ranks, retrieval_ranks
from clipse.runs.folder import (
    RunFolder,
    TrainResult,
    append_csv,
    atomic_torch_save,
    default_run_dir,
    read_csv,
    truncate_csv,
)
from clipse.util.errors import UserError
from clipse.util.paths import ADHOC_RUNS_DIR


def result(status="completed", **changes):
    fields = dict(run_id="r", run_dir="d", status=status, epochs_done=2, best_epoch=1, best_value=0.5,
                  best_metrics={"val_r1_mean": 0.5}, last_metrics={"val_r1_mean": 0.4}, weight_stats={"weight_std": 0.0},
                  test_metrics=None, diverged_step=None, seconds=1.5)
    return TrainResult(**{**fields, **changes})


def test_a_new_folder_starts_and_holds_the_config(tmp_path):
    folder = RunFolder(tmp_path / "studies" / "mine" / "run")
    config = TrainConfig(lr=0.01, run_dir=str(folder.path))
    assert folder.start(config) is None
    assert folder.saved_config() == config and folder.config_differences(config) == []


def test_resume_of_a_folder_that_holds_nothing_yet_starts_it(tmp_path):
    """A retried trial resumes a folder its first attempt may never have written."""
    folder = RunFolder(tmp_path / "never-written")
    assert folder.start(TrainConfig(resume=True)) is None and folder.config_file.is_file()
    assert folder.load_last("cpu") is None and folder.result() is None


def test_a_folder_holding_a_run_is_refused_without_resume(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.start(TrainConfig())
    atomic_torch_save({"epoch": 1}, folder.last_checkpoint)
    with pytest.raises(UserError, match=r"run: already holds a run; pass --resume to continue it"):
        folder.start(TrainConfig())
    folder.last_checkpoint.unlink()
    folder.save_result(result())
    with pytest.raises(UserError, match="already holds a run"):
        folder.start(TrainConfig())


def test_resume_with_other_settings_names_each_difference(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.start(TrainConfig(lr=0.002, run_dir="a"))
    with pytest.raises(UserError, match=re.escape("cannot resume with a different configuration "
                                                  "(epochs: 2 -> 7; lr: 0.002 -> 0.5)")):
        folder.start(TrainConfig(lr=0.5, epochs=7, resume=True))
    # settings that do not change what is computed may change
    assert folder.start(TrainConfig(lr=0.002, resume=True, run_dir="b", threads=3, progress=False)) is None


@pytest.mark.parametrize("status,reused", [("completed", True), ("diverged", True), ("stopped", False)])
def test_resume_returns_a_finished_result_and_continues_a_stopped_run(tmp_path, status, reused):
    folder = RunFolder(tmp_path / "run")
    folder.start(TrainConfig())
    folder.save_result(result(status))
    got = folder.start(TrainConfig(resume=True))
    assert (got == result(status)) if reused else got is None


def test_results_and_ranks_round_trip_without_temporary_files(tmp_path):
    folder = RunFolder(tmp_path)
    stored = result(test_metrics={"test_r1_mean": 0.25}, diverged_step=None, best_value=float("-inf"))
    folder.save_result(stored)
    assert folder.result() == stored
    ranks = retrieval_ranks(torch.eye(3), torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]),
                            [0, 1, 1, 2], torch.ones(4, 3, dtype=torch.bool))
    folder.save_test_ranks(ranks)
    loaded = folder.test_ranks()
    assert loaded.rule == ranks.rule == "tie-aware"
    assert metrics_from_ranks(loaded) == metrics_from_ranks(ranks) and metrics_from_ranks(ranks)["tie_share"] > 0
    folder.save_last({"epoch": 3, "state_dict": {"w": torch.ones(2)}})
    assert folder.load_last("cpu")["epoch"] == 3
    assert not list(tmp_path.glob("*tmp*"))


def test_csv_rows_append_under_one_header_and_truncate_inclusively(tmp_path):
    path = tmp_path / "rows.csv"
    assert read_csv(path) == []
    append_csv(path, [])
    assert not path.exists()
    append_csv(path, [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}])
    append_csv(path, [{"step": 3, "loss": 0.3}])
    assert path.read_text().count("step") == 1
    truncate_csv(path, "step", 2)
    assert [row["step"] for row in read_csv(path)] == ["1", "2"]
    truncate_csv(tmp_path / "missing.csv", "step", 1)  # nothing to do
    assert not (tmp_path / "missing.csv").exists()


def steps(*numbers):
    return [{"epoch": 1 + (n - 1) // 2, "step": n, "loss": 1.0 / n} for n in numbers]


@pytest.mark.parametrize("written_steps,written_epochs,repaired_steps,repaired_epoch", [
    ((1, 2, 3, 4, 5), (1, 2, 3), (), False), ((1, 2), (1,), (3, 4), True), ((1, 2, 3, 4), (1,), (), True),
    ((1, 2, 3, 4), (1, 2), (), False)])
def test_rewind_makes_the_rows_agree_with_the_checkpoint(tmp_path, written_steps, written_epochs, repaired_steps,
                                                         repaired_epoch):
    """Checkpoint after epoch 2 (step 4). Rows past it are dropped; rows of epoch 2 that a crash
    kept from being written come from the checkpoint, once, and are returned (for the trackers)."""
    folder = RunFolder(tmp_path)
    folder.append_steps(steps(*written_steps))
    for epoch in written_epochs:
        folder.append_epoch({"epoch": epoch, "train_loss": 1.0 / epoch})
    pending_epoch = {"epoch": 2, "train_loss": 0.5}
    written = folder.rewind(2, 4, {"steps": steps(3, 4), "epoch": pending_epoch})
    assert [int(r["step"]) for r in read_csv(folder.training_csv)] == [1, 2, 3, 4]
    assert [int(r["epoch"]) for r in folder.epoch_rows()] == [1, 2]
    assert written == (steps(*repaired_steps), pending_epoch if repaired_epoch else None)


def test_rewind_writes_the_first_epochs_rows_when_none_were_written(tmp_path):
    folder = RunFolder(tmp_path)
    folder.rewind(1, 2, {"steps": steps(1, 2), "epoch": {"epoch": 1, "train_loss": 1.0}})
    assert [int(r["step"]) for r in read_csv(folder.training_csv)] == [1, 2]
    assert [int(r["epoch"]) for r in folder.epoch_rows()] == [1]


def test_rewind_to_the_start_drops_every_row(tmp_path):
    folder = RunFolder(tmp_path)
    folder.append_steps(steps(1, 2))
    folder.append_epoch({"epoch": 1, "train_loss": 1.0})
    assert folder.rewind(0, 0, None) == ([], None)
    assert read_csv(folder.training_csv) == [] and folder.epoch_rows() == []


def test_default_run_folders_and_run_ids():
    path = default_run_dir()
    assert path.parent == ADHOC_RUNS_DIR and re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", path.name)
    assert RunFolder(path).run_id("") == path.name and RunFolder(path).run_id("s") == f"s/{path.name}"


def test_rows_appended_to_an_older_file_keep_its_columns(tmp_path):
    """A run started by an older clipse, resumed by this one: its epochs.csv keeps its header."""
    path = tmp_path / "epochs.csv"
    path.write_text("epoch,train_loss\n1,0.5\n")
    append_csv(path, [{"epoch": 2, "train_loss": 0.4, "trained_by_pid": 123}])
    assert path.read_text() == "epoch,train_loss\n1,0.5\n2,0.4\n"
