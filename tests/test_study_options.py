"""Optuna's samplers, warm starts (--enqueue) and multi-objective studies, through the search's
Python API and command on tiny data, and the final report of a multi-objective study."""

import json
import math
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import load_study
from optuna.trial import TrialState

from clipse.config import TrainConfig
from clipse.final import FinalOptions, run_final
from clipse.runs.folder import RunFolder
from clipse.search.command import SearchOptions, run_search
from clipse.search.command import main as search_main
from clipse.search.samplers import SAMPLERS, build_sampler, grid_size, grid_values
from clipse.search.spaces import Param, SearchSpace, load_space
from clipse.search.study import (
    SETTINGS_ATTR,
    WEIGHT_CONSTRAINT,
    StudySettings,
    count_trials,
    create_or_load,
    open_storage,
    ranked_trials,
    retry_lost_trial,
    study_names,
)
from clipse.training.trainer import train
from clipse.util.errors import UserError

TINY_TRAINING = {"pretrained": "none", "shapes_train_images": 48, "shapes_val_images": 12, "shapes_test_images": 12, "batch_size": 16,
                 "epochs": 1}
# stepped and categorical parameters only, so that the grid sampler can search it too: 3 x 2 x 2 points
STEPPED_SPACE = {"extends": "_shared", "fixed": {"loss": "sanw_debias"}, "params": {
    "lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-3, "step": 1.0e-3},
    "alpha": {"type": "categorical", "choices": [0.1, 0.3]},
    "topical_batching": {"type": "categorical", "choices": [False, True]}}}


@pytest.fixture
def stepped_space(tmp_path):
    """The stepped space as a file (without the shared settings: its own params only)."""
    path = tmp_path / "stepped.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in STEPPED_SPACE.items() if k != "extends"}))
    return path


def options(tmp_path, space, trials, **changes) -> SearchOptions:
    return SearchOptions(space=str(space), trials=trials, studies_dir=tmp_path / "studies",
                         training={**TINY_TRAINING, "data_root": str(tmp_path.parent / "shapes-samplers")}, **changes)


@pytest.fixture(autouse=True)
def _run_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_grid_points_of_a_space(stepped_space):
    space = load_space(str(stepped_space))
    assert grid_values(space) == {"lr": [0.001, 0.002, 0.003], "alpha": [0.1, 0.3], "topical_batching": [False, True]}
    assert grid_size(space) == 12


def test_grid_needs_stepped_parameters(tmp_path):
    with pytest.raises(UserError, match="'lr' is a continuous float; give it a step"):
        run_search(options(tmp_path, "debias", 2, sampler="grid"))
    assert study_names(open_storage(str(tmp_path / "studies" / "debias" / "journal.log"))) == []  # nothing created


def test_a_sampler_for_one_objective_refuses_several(tmp_path, capsys):
    code = search_main(["--space", "debias", "--trials", "2", "--studies-dir", str(tmp_path / "studies"),
                        "--sampler", "cmaes", "--metric", "val_i2t_r1,val_t2i_r1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--sampler cmaes optimises one objective" in err[0]


def test_several_objectives_cannot_be_pruned_or_named_twice(tmp_path):
    with pytest.raises(UserError, match="cannot prune a study of several objectives"):
        run_search(options(tmp_path, "debias", 2, metric="val_i2t_r1,val_t2i_r1", pruner="median"))
    with pytest.raises(UserError, match="names a metric twice"):
        run_search(options(tmp_path, "debias", 2, metric="val_i2t_r1,val_i2t_r1"))
    with pytest.raises(UserError, match="'val_r5': not a validation metric"):
        run_search(options(tmp_path, "debias", 2, metric="val_i2t_r1,val_r5"))


def test_a_retry_keeps_the_grid_point_of_the_lost_trial(tmp_path):
    """A lost trial's retry must train the same grid point, and the grid still gets every point
    exactly once among the trials that count."""
    grid = {"x": [0, 1, 2, 3]}
    space = SearchSpace(name="g", path=Path("g.yaml"), description="", params={"x": Param("x", "categorical",
                                                                                          choices=(0, 1, 2, 3))})
    study = optuna.create_study(sampler=build_sampler("grid", 0, 0, space, 0))
    lost = study.ask()
    lost.suggest_categorical("x", grid["x"])
    assert retry_lost_trial(study, study.get_trials()[0], "its worker died", max_retries=1, lock=tmp_path / "ask.lock")
    for _ in range(4):
        trial = study.ask()
        study.tell(trial, float(trial.suggest_categorical("x", grid["x"])))
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert done[0].user_attrs["retry_of"] == 0 and done[0].params == study.get_trials()[0].params
    assert sorted(t.params["x"] for t in done) == [0, 1, 2, 3]


@pytest.mark.slow
def test_every_sampler_runs_trials_and_is_kept_on_resume(tmp_path, stepped_space):
    for sampler in SAMPLERS:
        name = f"s-{sampler}"
        result = run_search(options(tmp_path, stepped_space, 1, sampler=sampler, study=name, pruner="none",
                                    startup_trials=1))
        assert result.counts.complete == 1, sampler
        resumed = run_search(options(tmp_path, stepped_space, 2, study=name))  # no --sampler: the stored one
        assert resumed.counts.complete == 2, sampler
        study = load_study(tmp_path, name)
        assert study.user_attrs["clipse:settings"]["sampler"] == sampler
        points = [json.dumps(t.params, sort_keys=True) for t in study.get_trials()]
        if sampler in ("grid", "qmc"):
            assert len(set(points)) == 2, (sampler, points)  # neither repeats a point
    grid_study = load_study(tmp_path, "s-grid")
    assert all("grid_id" in t.system_attrs for t in grid_study.get_trials())
    with pytest.raises(UserError, match="--sampler tpe \\(study has cmaes\\)"):
        run_search(options(tmp_path, stepped_space, 3, study="s-cmaes", sampler="tpe"))


@pytest.mark.slow
def test_grid_search_trains_each_point_once(tmp_path, stepped_space, capsys):
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({"fixed": {"loss": "infonce"}, "params": {
        "lr": {"type": "float", "low": 1.0e-3, "high": 2.0e-3, "step": 1.0e-3},
        "topical_batching": {"type": "categorical", "choices": [False, True]}}}))
    result = run_search(options(tmp_path, small, 10, sampler="grid", pruner="none"))
    assert "the grid has 4 points, so the study has 4 trials" in capsys.readouterr().err
    assert result.total == 4 and result.counts.complete == 4
    points = sorted((t.params["lr"], t.params["topical_batching"]) for t in load_study(tmp_path, "small").get_trials())
    assert points == [(0.001, False), (0.001, True), (0.002, False), (0.002, True)]


@pytest.mark.slow
def test_enqueued_points_come_first_and_are_not_repeated(tmp_path, stepped_space):
    starts = tmp_path / "starts.yaml"
    starts.write_text(yaml.safe_dump([{"lr": 0.003, "alpha": 0.3, "topical_batching": True}, {"lr": 0.001}]))
    run_search(options(tmp_path, stepped_space, 3, enqueue=str(starts), pruner="none"))
    study = load_study(tmp_path, "stepped")
    first, second = study.get_trials()[:2]
    assert first.params == {"lr": 0.003, "alpha": 0.3, "topical_batching": True}
    assert second.params["lr"] == 0.001  # the sampler chose the others
    run_search(options(tmp_path, stepped_space, 5, enqueue=str(starts)))  # resumed with the same file
    trials = load_study(tmp_path, "stepped").get_trials()
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sum(t.params == first.params for t in trials) == 1

    more = tmp_path / "more.yaml"  # more points than the total leaves room for
    more.write_text(yaml.safe_dump([{"lr": 0.002, "alpha": 0.1, "topical_batching": False}, {"lr": 0.003, "alpha": 0.1},
                                    {"lr": 0.001, "alpha": 0.1}]))
    run_search(options(tmp_path, stepped_space, 2, enqueue=str(more), study="small-room"))
    assert [t.params["lr"] for t in load_study(tmp_path, "small-room").get_trials()] == [0.002, 0.003]


@pytest.mark.slow
def test_enqueue_defaults_starts_from_the_documented_settings(tmp_path):
    run_search(options(tmp_path, "bandpass", 1, enqueue="defaults", pruner="none"))
    trial = load_study(tmp_path, "bandpass").get_trials()[0]
    # the fine-tuning defaults (the temperature is the checkpoint's own, not searched)
    assert trial.params == {"lr": 0.001, "warmup_epochs": 1.0, "weight_decay": 0.1, "topical_batching": False,
                            "alpha": 0.2, "m1": 0.2, "m2": 0.85, "gamma": 0.75, "rho": 0.5}


@pytest.mark.parametrize("content, message", [
    ("lr: 0.001", "expected a YAML list of parameter sets"),
    ("- {lr: 0.001, delta: 0.2}", "item 1: 'delta' is not a parameter of space stepped"),
    ("- {lr: 0.5}", "item 1: lr=0.5 is outside the space's range"),
    ("- {alpha: 0.2}", "item 1: alpha=0.2 is outside the space's range"),
    ("- [0.001]", "item 1: expected a mapping of parameter values"),
])
def test_bad_enqueue_files_are_one_line(tmp_path, stepped_space, capsys, content, message):
    starts = tmp_path / "starts.yaml"
    starts.write_text(content)
    code = search_main(["--space", str(stepped_space), "--trials", "2", "--studies-dir", str(tmp_path / "studies"),
                        "--enqueue", str(starts)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert study_names(open_storage(str(tmp_path / "studies" / "stepped" / "journal.log"))) == []  # nothing created


def test_enqueue_is_refused_for_a_grid_search(tmp_path, stepped_space):
    with pytest.raises(UserError, match="--enqueue: the grid sampler tries every point of the grid already"):
        run_search(options(tmp_path, stepped_space, 2, sampler="grid", enqueue="defaults"))


def test_fresh_samplers_continue_one_qmc_sequence_and_one_grid_order(stepped_space):
    """Workers build a sampler per trial: QMC and grid must keep the study's seed, or each trial
    would start another sequence (another grid order) and points would repeat."""
    space = load_space(str(stepped_space))

    def points(make_sampler):
        study = optuna.create_study()
        for number in range(6):
            study.sampler = make_sampler(number)
            trial = study.ask()
            point = space.suggest(trial)
            study.tell(trial, 0.0)
            yield tuple(point[key] for key in space.params)

    for name in ("qmc", "grid"):
        one_sampler = build_sampler(name, 7, 0, space, 0)
        assert list(points(lambda n: build_sampler(name, 7, 0, space, n))) == list(points(lambda n: one_sampler))
    assert len(set(points(lambda n: build_sampler("grid", 7, 0, space, n)))) == 6


@pytest.mark.slow
def test_multi_objective_study_and_its_report(tmp_path, capsys):
    metrics = ["val_i2t_r1", "val_t2i_r1"]
    code = search_main(["--space", "debias", "--trials", "4", "--studies-dir", str(tmp_path / "studies"),
                        "--metric", ",".join(metrics), "--data-root", str(tmp_path.parent / "shapes-samplers"),
                        *[f"--{k.replace('_', '-')}={v}" for k, v in TINY_TRAINING.items()], "--epochs", "2"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "pruning is off" in out.err and "Pareto front of 'debias'" in out.out
    study = load_study(tmp_path, "debias")
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE] * 2 and study.metric_names == metrics
    trials = study.get_trials()
    assert all(t.state == TrialState.COMPLETE and not t.intermediate_values for t in trials)
    for t in trials:  # each objective at the epoch of the best val_r1_mean
        assert t.values == [t.user_attrs[m] for m in metrics]
        assert math.isclose(t.user_attrs["val_r1_mean"], (t.values[0] + t.values[1]) / 2, rel_tol=1e-6)
    front = {t.number for t in study.best_trials}
    for line in out.out.splitlines():
        if line.startswith("| ") and line.split("|")[1].strip().isdigit():
            assert int(line.split("|")[1]) in front  # only the front is listed

    result = run_final(FinalOptions(study="debias", seeds=1, top_k=5, resamples=50, studies_dir=tmp_path / "studies"))
    chosen = {label for label in result.verdicts}
    assert chosen == {f"trial-{n}" for n in front}
    summary = result.files["summary_md"].read_text()
    assert "the Pareto front of val_i2t_r1, val_t2i_r1" in summary and "validation epoch (val_r1_mean)" in summary
    assert len(front) >= 5 or f"it holds {len(front)} of the 5 asked for" in summary
    assert {"search_history", "param_importances", "timeline", "sanw_slice"} <= set(result.files)
    assert "intermediate_values" not in result.files  # nothing is reported per epoch without pruning
    assert all(path.stat().st_size > 0 for path in result.files.values())


def study_with_trials(metrics: list[str], completed: int) -> optuna.Study:
    """An in-memory debias study as clipse makes them, with random trials reporting two epochs."""
    from dataclasses import asdict

    from clipse.search.study import SETTINGS_ATTR, StudySettings

    space = load_space("debias")
    settings = StudySettings(space="debias", space_digest=space.digest, space_definition=space.to_dict(),
                             metric=",".join(metrics))
    study = optuna.create_study(directions=["maximize"] * len(metrics), sampler=optuna.samplers.RandomSampler(0))
    study.set_user_attr(SETTINGS_ATTR, asdict(settings))
    for number in range(completed):
        trial = study.ask()
        params = space.suggest(trial)
        values = [params["lr"] * 100 + i * params["alpha"] for i in range(len(metrics))]
        if len(metrics) == 1:
            trial.report(values[0] / 2, 1)
            trial.report(values[0], 2)
        study.tell(trial, values if len(metrics) > 1 else values[0])
    return study


@pytest.mark.parametrize("metrics", [["val_r1_mean"], ["val_i2t_r1", "val_t2i_r1"]])
def test_every_search_figure_is_drawn(tmp_path, caplog, metrics):
    from clipse.report.search_plots import plot_search

    files = plot_search(study_with_trials(metrics, 8), tmp_path)
    expected = {"search_history", "param_importances", "timeline", "sanw_slice"} | (
        {"intermediate_values"} if len(metrics) == 1 else set())
    assert set(files) == expected and all(path.stat().st_size > 10_000 for path in files.values())
    assert not [r for r in caplog.records if "not drawn" in r.getMessage()]


def test_figures_of_a_study_without_completed_trials_say_why(tmp_path, caplog):
    from clipse.report.search_plots import plot_search

    files = plot_search(study_with_trials(["val_r1_mean"], 0), tmp_path)
    assert all(path.exists() for path in files.values())
    said = {r.getMessage() for r in caplog.records if "not drawn" in r.getMessage()}
    assert said == {f"{name}.png not drawn: the study has no completed trial yet"
                    for name in ("search_history", "param_importances", "sanw_slice")}


# ----------------------------------------------------------------------------------------------
# --min-weight-std: trials whose SANW weights stay uniform are infeasible


def _floor_study(tmp_path, min_weight_std=0.05):
    space = load_space("debias")
    settings = StudySettings(space=space.name, space_digest=space.digest, space_definition=space.to_dict(),
                             min_weight_std=min_weight_std)
    return {"settings": settings, "study": create_or_load("floor", open_storage(str(tmp_path / "journal.log")), settings)}


def test_infeasible_trials_are_never_best(tmp_path):
    settings = _floor_study(tmp_path)
    study = settings.pop("study")
    for value, spread in ((0.9, 0.01), (0.5, 0.2), (0.7, 0.05), (0.95, None), (0.99, float("nan"))):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-2)
        trial.set_constraint(WEIGHT_CONSTRAINT, settings["settings"].weight_shortfall(spread))  # as the objective does
        study.tell(trial, value)
    assert [t.constraints[WEIGHT_CONSTRAINT] for t in study.get_trials()] == pytest.approx([0.04, -0.15, 0, 0.05, 0.05])
    assert [t.value for t in ranked_trials(study)] == [0.7, 0.5]  # the others spread too little, or logged nothing
    counts = count_trials(study)
    assert counts.best_value == 0.7 and counts.infeasible == 3 and counts.complete == 5
    assert study.best_trial.value == 0.7  # Optuna agrees
    plain = optuna.create_study(direction="maximize")
    plain.tell(plain.ask(), 0.9)
    assert ranked_trials(plain)[0].value == 0.9 and count_trials(plain).infeasible == 0


@pytest.mark.slow
def test_a_search_whose_weights_never_spread_enough_has_no_best(tmp_path, stepped_space, capsys):
    floored = tmp_path / "floored.yaml"
    floored.write_text(stepped_space.read_text() + "min_weight_std: 1000.0\n")  # no SANW weight spreads that far
    assert search_main(["--space", str(floored), "--trials", "2", "--studies-dir", str(tmp_path / "studies"),
                        "--pruner", "none", "--data-root", str(tmp_path.parent / "shapes-samplers"),
                        *[f"--{k.replace('_', '-')}={v}" for k, v in TINY_TRAINING.items()]]) == 0
    out = capsys.readouterr()
    assert "min weight std 1000" in out.err
    assert "2 complete, 2 of them infeasible" in out.out and "(no feasible trial:" in out.out
    study = load_study(tmp_path, "floored")
    assert all(t.user_attrs["weights_weight_std"] < 1000 for t in study.get_trials())
    with pytest.raises(UserError, match="none of its 2 completed trials is feasible"):
        run_final(FinalOptions(study="floored", studies_dir=tmp_path / "studies", seeds=1))
    with pytest.raises(UserError, match=r"--min-weight-std 0.0 \(study has 1000.0\)"):
        run_search(options(tmp_path, floored, 3, study="floored", min_weight_std=0.0))
    with pytest.raises(UserError, match="--min-weight-std: must be at least 0, got -1"):
        run_search(options(tmp_path, floored, 3, study="other", min_weight_std=-1.0))


# ----------------------------------------------------------------------------------------------
# --seeds-per-trial


@pytest.mark.slow
def test_a_trial_of_several_seeds_is_worth_their_mean_and_pausing_changes_no_seed(tmp_path, stepped_space):
    result = run_search(SearchOptions(space=str(stepped_space), trials=2, studies_dir=tmp_path / "studies",
                                      sampler="random", pruner="none", seeds_per_trial=2, seed=5,
                                      training={**TINY_TRAINING, "epochs": 3,
                                                "data_root": str(tmp_path.parent / "shapes-samplers")}))
    assert result.counts.complete == 2
    study = load_study(tmp_path, "stepped")
    for trial in study.get_trials():
        seeds = trial.user_attrs["seeds"]
        assert [s["seed"] for s in seeds] == [5, 6] and all(s["status"] == "completed" for s in seeds)
        runs = [RunFolder(Path(s["run_dir"])) for s in seeds]
        assert [Path(s["run_dir"]).parent for s in seeds] == [Path(trial.user_attrs["run_dir"])] * 2
        values = [run.result().best_value for run in runs]
        assert trial.value == pytest.approx(sum(values) / 2) and [s["value"] for s in seeds] == values
        per_epoch = [[float(row["val_r1_mean"]) for row in run.epoch_rows()] for run in runs]
        assert [trial.intermediate_values[e] for e in (1, 2, 3)] == pytest.approx(
            [(a + b) / 2 for a, b in zip(*per_epoch)])
    # paused after every epoch and resumed, a seed trains exactly as one uninterrupted run
    first = study.get_trials()[0]
    alone = TrainConfig.from_mapping({**TINY_TRAINING, "epochs": 3, "data_root": str(tmp_path.parent / "shapes-samplers"),
                                      "loss": "sanw_debias", **first.params, "seed": 6, "progress": False,
                                      "run_dir": str(tmp_path / "alone"), "registry": str(tmp_path / "registry.csv")},
                                     "test")
    train(alone)
    together = RunFolder(Path(first.user_attrs["seeds"][1]["run_dir"]))
    assert [r["val_r1_mean"] for r in RunFolder(tmp_path / "alone").epoch_rows()] == \
        [r["val_r1_mean"] for r in together.epoch_rows()]
    assert "--seeds-per-trial 1 (study has 2)" in _conflict(tmp_path, stepped_space, seeds_per_trial=1)


def _conflict(tmp_path, space, **changes) -> str:
    with pytest.raises(UserError) as info:
        run_search(options(tmp_path, space, 3, study="stepped", **changes))
    return str(info.value)


class PruningTrial:
    """What train_seeds needs of an Optuna trial; prunes at the first epoch it is told of."""

    def __init__(self):
        self.reports, self.attrs = [], {}

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return True

    def set_user_attr(self, key, value):
        self.attrs[key] = value


def test_a_pruned_trial_of_several_seeds_ends_each_seed_as_a_stopped_run(tiny):
    from clipse.search.objective import train_seeds

    config = tiny(epochs=3)
    trial = PruningTrial()
    results, status = train_seeds(trial, config, 2, ["val_r1_mean"])
    assert status == "stopped" and [step for step, _ in trial.reports] == [1]
    assert [r.status for r in results] == ["stopped", "stopped"] and all(r.epochs_done == 1 for r in results)
    for result in results:
        assert RunFolder(Path(result.run_dir)).result().status == "stopped"  # result.json written
    rows = Path(config.registry).read_text().splitlines()
    assert len(rows) == 3  # a header and one row per seed
    # retried with epoch 1 already reported: the pruner is asked nothing before the seeds train on
    again = PruningTrial()
    for result in results:
        (Path(result.run_dir) / "result.json").unlink()   # as after a lost worker: paused, not finished
    results, status = train_seeds(again, config, 2, ["val_r1_mean"], reported=frozenset({1}))
    assert [step for step, _ in again.reports] == [2] and all(r.epochs_done == 2 for r in results)


def test_a_study_whose_creation_was_cut_short_is_made_again(tmp_path):
    """Killed (or the storage lost) between creating the study and storing its settings: the
    next search completes the creation instead of refusing a study without settings."""
    journal = tmp_path / "studies" / "cut" / "journal.log"
    journal.parent.mkdir(parents=True)
    optuna.create_study(study_name="cut", storage=open_storage(str(journal)), directions=["maximize"] * 2)
    result = run_search(options(tmp_path, "baseline", 1, study="cut", pruner="none"))
    assert result.counts.complete == 1
    made = load_study(tmp_path, "cut")
    assert made.user_attrs[SETTINGS_ATTR]["space"] == "baseline" and len(made.directions) == 1
    foreign = tmp_path / "studies" / "foreign" / "journal.log"
    foreign.parent.mkdir(parents=True)
    plain = optuna.create_study(study_name="foreign", storage=open_storage(str(foreign)), direction="maximize")
    plain.tell(plain.ask(), 1.0)
    with pytest.raises(UserError, match="not made by this version of clipse"):
        run_search(options(tmp_path, "baseline", 1, study="foreign"))
