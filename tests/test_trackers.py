"""Experiment trackers: TensorBoard event files and MLflow runs hold what the CSVs hold; a
tracker that fails costs one warning line and nothing else."""

import csv
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from clipse.config import TrainConfig
from clipse.evaluation.metrics import METRIC_KEYS
from clipse.runs.folder import RunFolder, TrainResult
from clipse.trackers import TRACKERS, Tracker, open_trackers, parse_report_to
from clipse.trackers.mlflow import resolve_mlflow_uri
from clipse.training.trainer import train
from clipse.util.errors import UserError


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------------------------
# settings


def test_unknown_tracker_is_a_user_error_naming_the_choices():
    with pytest.raises(UserError, match=r"unknown tracker 'nope' \(choose from none, .*mlflow.*tensorboard"):
        TrainConfig(report_to="tensorboard,nope").validate()


def test_a_tracker_without_its_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(TRACKERS["mlflow"], "package", "clipse_no_such_package")
    with pytest.raises(UserError, match=r"needs the Python package clipse_no_such_package \(pip install 'mlflow"):
        TrainConfig(report_to="mlflow").validate()


def test_a_password_in_the_mlflow_uri_is_refused():
    with pytest.raises(UserError, match="MLFLOW_TRACKING_PASSWORD"):
        TrainConfig(report_to="mlflow", mlflow_uri="https://me:secret@mlflow.example.org").validate()


def test_report_to_lists_names_once_and_none_names_nothing():
    assert parse_report_to("none") == []
    assert parse_report_to(" mlflow, tensorboard,mlflow ") == ["mlflow", "tensorboard"]


def test_tracking_settings_may_change_on_resume():
    from clipse.config import TRACKING_KEYS
    from clipse.runs.folder import RESUME_FREE_KEYS

    assert set(TRACKING_KEYS) == {"report_to", "mlflow_uri", "mlflow_experiment", "mlflow_parent_run"}
    assert set(TRACKING_KEYS) <= RESUME_FREE_KEYS


def test_the_default_mlflow_store_is_beside_the_registry_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_mlflow_uri(None, "studies/run_registry.csv") == f"sqlite:///{tmp_path}/studies/mlflow.db"
    config = TrainConfig(registry="elsewhere/run_registry.csv")
    assert resolve_mlflow_uri(config) == f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    assert resolve_mlflow_uri("sqlite:///rel/m.db", "x") == f"sqlite:///{tmp_path}/rel/m.db"
    assert resolve_mlflow_uri("sqlite:////abs/m.db", "x") == "sqlite:////abs/m.db"
    assert resolve_mlflow_uri("mlruns", "x") == str(tmp_path / "mlruns")
    for uri in ("http://127.0.0.1:5000", "https://mlflow.example.org/", "postgresql://u@db/mlflow", "file:///a/b"):
        assert resolve_mlflow_uri(uri, "x") == uri


# ----------------------------------------------------------------------------------------------
# the group: a failing tracker is dropped with one warning


class Recording(Tracker):
    """Records its calls; raises in the call named by ``fail_in``."""

    name, package, pip = "recording", "csv", "csv"
    fail_in = None
    made: list["Recording"] = []

    def __init__(self):
        self.calls = []
        Recording.made.append(self)

    def _call(self, what, *args):
        self.calls.append(what)
        if what == self.fail_in:
            raise ConnectionError("refused")

    def target(self, config, folder):
        return "memory"

    def start(self, config, folder):
        self._call("start")

    def log_steps(self, rows):
        self._call("log_steps")

    def log_epoch(self, row):
        self._call("log_epoch")

    def finish(self, result, folder):
        self._call("finish")

    def abort(self, error):
        self._call(f"abort {type(error).__name__}")


@pytest.mark.parametrize("fail_in", ["start", "log_steps", "log_epoch", "finish"])
def test_a_failing_tracker_is_dropped_after_one_warning(tmp_path, monkeypatch, caplog, fail_in):
    broken = type("Broken", (Recording,), {"name": "broken", "fail_in": fail_in})
    monkeypatch.setitem(TRACKERS, "recording", Recording)
    monkeypatch.setitem(TRACKERS, "broken", broken)
    monkeypatch.setattr(Recording, "made", [])
    group = open_trackers(TrainConfig(report_to="broken,recording"), RunFolder(tmp_path))
    trackers = Recording.made
    group.log_steps([{"epoch": 1, "step": 1, "loss": 1.0}])
    group.log_epoch({"epoch": 1, "train_loss": 1.0})
    group.finish(TrainResult("r", str(tmp_path), "completed", 1, 1, 0.5, {}, {}, {}), RunFolder(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["broken tracker at memory cannot be reached (ConnectionError: refused); the run goes on "
                        "without it (its CSVs are kept)"]
    every_call = ["start", "log_steps", "log_epoch", "finish"]
    assert trackers[0].calls == every_call[:every_call.index(fail_in) + 1]
    assert trackers[1].calls == every_call


def interrupt_after_first_epoch(report):
    raise KeyboardInterrupt


def test_the_trainer_feeds_its_trackers_and_aborts_them_when_it_raises(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(TRACKERS, "recording", Recording)
    monkeypatch.setattr(Recording, "made", [])
    train(tiny(report_to="recording", run_dir=str(tmp_path / "whole")))
    assert Recording.made[0].calls == ["start", "log_steps", "log_epoch", "log_steps", "log_epoch", "finish"]
    with pytest.raises(KeyboardInterrupt):
        train(tiny(report_to="recording"), [interrupt_after_first_epoch])
    assert Recording.made[1].calls == ["start", "log_steps", "log_epoch", "abort KeyboardInterrupt"]


def test_a_diverged_run_reports_its_last_steps_then_finishes(tiny, monkeypatch, diverging_loss):
    monkeypatch.setitem(TRACKERS, "recording", Recording)
    monkeypatch.setattr(Recording, "made", [])
    assert train(tiny(report_to="recording", loss="diverges", diverge_at=5, log_every=1)).status == "diverged"
    assert Recording.made[0].calls == ["start", "log_steps", "finish"]


# ----------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_event_files_hold_the_csv_rows(tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny(report_to="tensorboard", loss="sanw_debias", alpha=0.3)
    result = train(config)
    run = Path(config.run_dir)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/temperature", "train/lr", "train/grad_norm", "sanw/weight_mean", "sanw/weight_std",
            "epoch/train_loss", "epoch/samples_per_s", *(f"val/{key}" for key in METRIC_KEYS),
            "hparam/best_val_r1_mean"} <= tags
    steps = read_csv(run / "training.csv")
    loss = events.Scalars("train/loss")
    assert [point.step for point in loss] == [int(row["step"]) for row in steps]
    assert [point.value for point in loss] == pytest.approx([float(row["loss"]) for row in steps], rel=1e-6)
    epochs = read_csv(run / "epochs.csv")
    val = events.Scalars("val/r1_mean")
    assert [point.step for point in val] == [int(row["epoch"]) for row in epochs]
    assert [point.value for point in val] == pytest.approx([float(row["val_r1_mean"]) for row in epochs], rel=1e-6)
    assert events.Scalars("hparam/best_val_r1_mean")[0].value == pytest.approx(result.best_value, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# MLflow


def mlflow_runs_of(uri, run_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("clipse")
    return client, client.search_runs([experiment.experiment_id], f"tags.`clipse.run_dir` = '{Path(run_dir)}'")


@pytest.mark.slow
def test_a_trial_is_a_nested_mlflow_run_with_params_metrics_and_artifacts(tiny, mlflow_server):
    from clipse.trackers.mlflow import study_run

    parent = study_run(mlflow_server, "clipse", "tracked")
    assert study_run(mlflow_server, "clipse", "tracked") == parent  # found again, not created twice
    config = tiny(report_to="mlflow", mlflow_uri=mlflow_server, mlflow_parent_run=parent, study="tracked", trial=3)
    result = train(config)
    client, runs = mlflow_runs_of(mlflow_server, config.run_dir)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "tracked/trial-3" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["clipse.status"] == "completed" and run.data.tags["clipse.trial"] == "3"
    assert run.data.params["lr"] == str(config.lr) and run.data.params["loss"] == "infonce"
    assert run.data.params["mlflow_parent_run"] == parent
    history = sorted(client.get_metric_history(run.info.run_id, "val_r1_mean"), key=lambda metric: metric.step)
    epochs = read_csv(Path(config.run_dir) / "epochs.csv")
    assert [metric.step for metric in history] == [1, 2]
    assert [metric.value for metric in history] == pytest.approx([float(row["val_r1_mean"]) for row in epochs])
    assert len(client.get_metric_history(run.info.run_id, "loss")) == len(read_csv(Path(config.run_dir) /
                                                                                  "training.csv"))
    assert run.data.metrics["best_val_r1_mean"] == pytest.approx(result.best_value)
    assert {"training.csv", "epochs.csv", "dynamics.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_run(tiny, mlflow_server):
    config = tiny(report_to="mlflow", mlflow_uri=mlflow_server)
    with pytest.raises(KeyboardInterrupt):
        train(config, [interrupt_after_first_epoch])
    client, runs = mlflow_runs_of(mlflow_server, config.run_dir)
    assert [run.info.status for run in runs] == ["KILLED"]
    train(config.replace(resume=True))
    client, runs = mlflow_runs_of(mlflow_server, config.run_dir)
    assert [run.info.status for run in runs] == ["FINISHED"]
    run_id = runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "val_r1_mean")] == [1, 2]
    steps = [int(row["step"]) for row in read_csv(Path(config.run_dir) / "training.csv")]
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == steps  # no step twice


@pytest.mark.slow
def test_a_new_run_in_a_used_folder_gets_its_own_mlflow_run(tiny, mlflow_server):
    """A run folder deleted and trained again (not resumed) must not add to the old record."""
    import shutil

    config = tiny(report_to="mlflow", mlflow_uri=mlflow_server, epochs=1, lr=0.001)
    train(config)
    shutil.rmtree(config.run_dir)
    train(config.replace(lr=0.004, resume=True))  # final runs always pass resume; nothing is there to resume
    _, runs = mlflow_runs_of(mlflow_server, config.run_dir)
    assert sorted(run.data.params["lr"] for run in runs) == ["0.001", "0.004"]
    assert all(len(run.data.metrics) > 0 and run.info.status == "FINISHED" for run in runs)


@pytest.mark.slow
def test_log_files_uploads_files_and_folders(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    from clipse.trackers.mlflow import log_files, study_run

    (tmp_path / "report.md").write_text("# report\n")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"png")
    run_id = study_run(mlflow_server, "clipse", "files")
    log_files(mlflow_server, run_id, [tmp_path / "report.md", tmp_path / "figures"], artifact_path="final")
    client = MlflowClient(mlflow_server)
    assert {a.path for a in client.list_artifacts(run_id, "final")} == {"final/report.md", "final/figures"}
    assert [a.path for a in client.list_artifacts(run_id, "final/figures")] == ["final/figures/a.png"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # MLflow's, not ours
def test_the_default_mlflow_store_lies_beside_the_registry(tiny, tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # as a SLURM job may start in another folder
    config = tiny(report_to="mlflow", epochs=1)
    train(config)
    store = Path(config.registry).parent
    client, runs = mlflow_runs_of(f"sqlite:///{store}/mlflow.db", config.run_dir)
    assert [run.info.status for run in runs] == ["FINISHED"]
    assert (store / "mlartifacts" / runs[0].info.run_id / "artifacts" / "epochs.csv").is_file()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.slow
def test_an_unreachable_mlflow_server_costs_one_warning_line(tmp_path):
    """Through the command line, whose logging goes to stderr: one line, and the run is whole."""
    run = tmp_path / "run"
    args = ["--pretrained", "none", "--shapes-train-images", "48", "--shapes-val-images", "12", "--shapes-test-images", "12", "--epochs", "2",
            "--batch-size", "16", "--no-progress", "--threads", "1", "--data-root", str(tmp_path / "shapes"),
            "--run-dir", str(run), "--registry", str(tmp_path / "registry.csv"),
            "--report-to", "mlflow", "--mlflow-uri", "http://127.0.0.1:9", "--log-every", "1"]
    timed = ("import sys, time; from clipse.train import main; started = time.perf_counter(); code = main(sys.argv[1:]); "
             "print(f'seconds {time.perf_counter() - started:.1f}'); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", timed, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "mlflow tracker at http://127.0.0.1:9 cannot be reached" in lines[0], lines
    seconds = float(done.stdout.split("seconds ")[-1])
    assert seconds < 15, done.stdout
    steps = read_csv(run / "training.csv")
    assert [int(row["epoch"]) for row in read_csv(run / "epochs.csv")] == [1, 2]
    assert [int(row["step"]) for row in steps] == list(range(1, 31))  # 240 pairs in batches of 16, 2 epochs


@pytest.mark.slow
def test_workers_starting_together_on_a_new_default_store_all_record(tmp_path):
    """Opening a new SQLite store creates its tables; workers must not race at that."""
    script = ("import sys; from clipse.config import TrainConfig; from clipse.runs.folder import RunFolder; "
              "from clipse.trackers import open_trackers; "
              "group = open_trackers(TrainConfig(report_to='mlflow', registry=sys.argv[1]), RunFolder(sys.argv[2])); "
              "print(len(group._trackers))")
    workers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "studies" / "run_registry.csv"),
                                 str(tmp_path / f"run{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(4)]
    answers = [worker.communicate(timeout=120) for worker in workers]
    assert [out.strip() for out, _ in answers] == ["1"] * 4, [err for _, err in answers]


@pytest.mark.slow
def test_a_study_and_its_final_report_nest_under_one_mlflow_run(tmp_path, mlflow_server, monkeypatch, capsys):
    """Trials in two local worker processes and the final runs log to the same experiment,
    nested under the study's run, which gets the report's files; TensorBoard files land in
    every trial's run folder."""
    from mlflow.tracking import MlflowClient

    from clipse.executors import ExecutorOptions
    from clipse.final import FinalOptions, run_final
    from clipse.search.command import SearchOptions, run_search

    monkeypatch.chdir(tmp_path)
    tracking = {"report_to": "mlflow,tensorboard", "mlflow_uri": mlflow_server, "mlflow_experiment": "study-e2e"}
    training = {"pretrained": "none", "shapes_train_images": 48, "shapes_val_images": 12, "shapes_test_images": 12, "batch_size": 16,
                "epochs": 2, "data_root": str(tmp_path / "shapes")}
    search = run_search(SearchOptions(space="debias", trials=2, pruner="none", studies_dir=tmp_path / "studies",
                                      min_weight_std=0.0, training=training, tracking=tracking,
                                      execution=ExecutorOptions(executor="local", workers=2)))
    assert search.counts.complete == 2
    run_final(FinalOptions(study="debias", seeds=1, resamples=50, studies_dir=tmp_path / "studies",
                           tracking=tracking))

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("study-e2e")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("clipse.role") == "study"]
    assert len(parents) == 1 and parents[0].data.tags["clipse.sampler"] == "tpe"
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] == 2
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = sorted(r.data.tags["mlflow.runName"] for r in children if r.data.tags.get("clipse.trial") not in (None, "None"))
    finals = [r for r in children if r.data.tags.get("clipse.study") == "debias/final"]
    assert trials == ["debias/trial-0", "debias/trial-1"], [r.data.tags for r in children]
    assert len(finals) == 2 and len(children) == 4  # the best trial and the baseline, one seed each
    assert len({r.data.params["run_dir"] for r in children}) == 4
    for run in children:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "val_r1_mean")) == 2
    assert {"final/summary.md", "final/runs.csv", "final/search_history.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "final")}
    for n in (0, 1):
        assert list((tmp_path / "studies" / "debias" / "runs" / f"trial-{n:05d}" / "tensorboard").glob("events.*"))


@pytest.mark.slow
def test_an_unreachable_mlflow_costs_a_search_one_warning_line(tmp_path, monkeypatch, caplog):
    """The study's run cannot be opened: the search warns once, its trials train without MLflow
    (no warning each) and keep their other tracker."""
    from clipse.search.command import SearchOptions, run_search

    monkeypatch.chdir(tmp_path)
    training = {"pretrained": "none", "shapes_train_images": 48, "shapes_val_images": 12, "shapes_test_images": 12, "batch_size": 16,
                "epochs": 1, "data_root": str(tmp_path / "shapes")}
    result = run_search(SearchOptions(space="baseline", trials=2, studies_dir=tmp_path / "studies", training=training,
                                      tracking={"report_to": "mlflow,tensorboard", "mlflow_uri": "http://127.0.0.1:9"}))
    assert result.counts.complete == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "mlflow" in r.getMessage()]
    assert len(warnings) == 1 and "cannot be reached" in warnings[0], warnings
    for n in (0, 1):
        run = tmp_path / "studies" / "baseline" / "runs" / f"trial-{n:05d}"
        assert list((run / "tensorboard").glob("events.*")) and (run / "epochs.csv").exists()
