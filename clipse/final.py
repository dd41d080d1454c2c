"""Final evaluation of a study:

    python -m clipse.final --study debias

or from Python, ``run_final(FinalOptions(study="debias"))``.

Takes the study's best configuration(s), trains each with several seeds and the same budget,
trains the InfoNCE baseline with the same seeds and budget, evaluates every run's best
validation checkpoint on the test split, and writes to ``studies/<study>/final/``:
``runs.csv``, ``summary.csv``, ``summary.md`` (mean ± std, difference to the baseline with a
95% paired-bootstrap interval, zero-shot retention), ``dynamics.png``, ``test_metrics.png``, the
WiSE-FT table and frontier (``wiseft.*``, ``clipse.report.wiseft``) and the search's figures
(``clipse.report.search_plots``). For a study of several objectives, the configurations come from
its Pareto front.

The baseline is the best trial of the ``--baseline-study`` study (default ``baseline``) when it
exists and has a completed trial; otherwise InfoNCE with the non-SANW settings of the best
configuration. ``summary.md`` says which. Finished runs are reused when the command is run again;
interrupted ones resume from their last checkpoint, and a run whose worker died is retried.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from clipse.config import (
    TrainConfig,
    add_tracking_arguments,
    config_overrides,
)
from clipse.executors import ExecutorOptions
from clipse.report.comparison import summary_verdicts
from clipse.report.search_plots import plot_search
from clipse.report.summary import RunRecord, write_report
from clipse.report.wiseft import DEFAULT_ALPHAS, parse_alphas, write_wiseft
from clipse.runs.plots import plot_runs
from clipse.search.best import best_trials, describe_values, find_study, open_study
from clipse.search.outages import announce_outages
from clipse.search.planned_runs import PlannedRun, train_planned
from clipse.search.study import (
    is_rdb_url,
    secure_storage,
    stored_settings,
    trial_settings,
)
from clipse.trackers.study_record import open_study_record
from clipse.training import build_embedded_model
from clipse.util.errors import cli_main, configure_logging
from clipse.util.fields import add_arguments, check_at_least, from_arguments, setting
from clipse.util.paths import DEFAULT_STUDIES_DIR, StudyFolder

BASELINE_LABEL = "baseline"


@dataclass
class FinalOptions:
    """Everything ``clipse.final`` takes; every field is a flag."""

    study: str = setting(help="the study to report on")
    storage: str | None = setting(None, "the study's storage", shown_default="studies/<study>/journal.log")
    studies_dir: Path = setting(DEFAULT_STUDIES_DIR, "where study folders live")
    top_k: int = setting(1, "how many of the best configurations")
    seeds: int = setting(3, "training seeds per configuration")
    epochs: int | None = setting(None, "epoch budget of every run", shown_default="the study's")
    baseline_study: str = setting("baseline", "study whose best trial is the baseline, when it exists")
    resamples: int = setting(2000, "bootstrap resamples")
    wiseft_alphas: str = setting(DEFAULT_ALPHAS, "WiSE-FT: mix every run's starting and fine-tuned weights at these "
                                 "alphas (0: start, 1: fine-tuned) and evaluate each mix; none: skip")
    execution: ExecutorOptions = setting(default_factory=ExecutorOptions, nested=True)
    # experiment trackers of the runs (report_to, mlflow_uri, mlflow_experiment; docs/reference/trackers.md)
    tracking: dict[str, Any] = field(default_factory=dict)


@dataclass
class FinalResult:
    study: str
    storage: str | None                  # as given, without a password (None: the study's journal)
    report_dir: Path
    files: dict[str, Path]               # runs, summary_csv, summary_md, test_metrics, dynamics, ...
    summary: list[dict[str, Any]]        # the rows of summary.csv: label, metric, mean, std, n, diff, ci
    verdicts: dict[str, str]             # configuration -> its R@1 mean against the baseline
    interrupted: bool = False


def choose_baseline(options: FinalOptions, storage: str | None, best: dict, best_label: str) -> tuple[dict, str]:
    """The best trial of the baseline study, else (no such study, or none of its trials
    completed) InfoNCE with the best config's other settings. Data, model and budget always come
    from the evaluated study, so the comparison is paired. ``storage``: the evaluated study's."""
    if options.baseline_study != options.study:
        shared = storage if storage and is_rdb_url(storage) else None  # a journal holds one study
        study = find_study(options.baseline_study, options.studies_dir, shared)
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if study is not None else []
        if done:
            trial = best_trials(study, 1)[0]
            values = describe_values(stored_settings(study).metrics, trial)
            return trial_settings(study, trial), (f"best trial #{trial.number} of study '{options.baseline_study}' "
                                                  f"({values}), trained here on this study's data and budget")
    return {**best, "loss": "infonce"}, (f"InfoNCE with the other settings of {best_label} (no completed "
                                         f"'{options.baseline_study}' study found)")


def plan_runs(options: FinalOptions, storage: str | None, study: optuna.Study, folder: StudyFolder,
              tracking: dict[str, Any] | None = None) -> tuple[list[PlannedRun], str]:
    settings = stored_settings(study)
    base = settings.base_config()
    epochs = base.epochs if options.epochs is None else options.epochs
    chosen = [(f"trial-{t.number}", trial_settings(study, t), t) for t in best_trials(study, options.top_k)]
    baseline, baseline_text = choose_baseline(options, storage, chosen[0][1], chosen[0][0])
    runs = []
    for label, chosen_settings in [(label, c) for label, c, _ in chosen] + [(BASELINE_LABEL, baseline)]:
        config = TrainConfig.from_mapping({**chosen_settings, **(tracking or {})}, f"{label} settings", base=base)
        for seed in range(options.seeds):
            runs.append(PlannedRun(label, seed, config.replace(
                epochs=epochs, seed=seed, eval_test=True, resume=True, progress=False, study=f"{study.study_name}/final",
                trial=None, registry=str(folder.registry),
                **({} if settings.multi_objective else {"select_metric": settings.metric}),
                run_dir=str(folder.final_run(label, seed))).validate()))
    lines = [f"# Final evaluation of study '{study.study_name}'", "",
             "- configurations: " + "; ".join(f"`{label}` ({describe_values(settings.metrics, t, study)}, loss {c['loss']})"
                                              for label, c, t in chosen)
             + (f" (the Pareto front of {', '.join(settings.metrics)}"
                + (f"; it holds {len(chosen)} of the {options.top_k} asked for)" if len(chosen) < options.top_k else ")")
                if settings.multi_objective else ""),
             f"- baseline: {baseline_text}",
             f"- seeds {', '.join(str(s) for s in range(options.seeds))}; {epochs} epochs per run; each run's best "
             f"validation epoch ({runs[0].config.select_metric}) is evaluated on the test split"]
    return runs, "\n".join(lines)


def run_final(options: FinalOptions) -> FinalResult:
    """Plan, train (reusing finished runs) and report; see the module docstring. Progress goes
    to stderr. Ctrl-C stops the runs and returns a result with ``interrupted`` set."""
    check_at_least(options, 1, "top_k", "seeds", "resamples")
    parse_alphas(options.wiseft_alphas)
    announce_outages()
    with secure_storage(options.storage) if options.storage else contextlib.nullcontext() as storage:
        return _final(options, storage)


def _final(options: FinalOptions, storage: str | None) -> FinalResult:
    study = open_study(options.study, options.studies_dir, storage)
    folder = StudyFolder.of(options.studies_dir, options.study)
    TrainConfig.from_mapping(options.tracking, "tracking settings").validate()
    record = open_study_record(options.tracking, folder.registry, options.study, folder.path)
    runs, intro = plan_runs(options, storage, study, folder, record.run_settings)
    for run in runs:  # before any worker needs it
        build_embedded_model(run.config)
    if not train_planned(runs, options.execution, folder.final_slurm, f"{options.study}-final",
                         f"final {options.study}", folder.final_runs):
        return FinalResult(options.study, storage, folder.final, {}, [], {}, interrupted=True)

    records = [RunRecord(r.folder.path, r.label, r.seed) for r in runs]
    files = write_report(records, BASELINE_LABEL, folder.final, intro, options.resamples)
    wiseft = write_wiseft(records, BASELINE_LABEL, folder.final, parse_alphas(options.wiseft_alphas))
    if wiseft:
        with open(files["summary_md"], "a") as summary_md:
            summary_md.write("\n" + wiseft["wiseft_md"].read_text())
    files.update(wiseft)
    files["dynamics"] = plot_runs([(r.folder.path, r.label) for r in runs], folder.final / "dynamics.png",
                                  title=f"final runs of '{options.study}'")
    files.update(plot_search(study, folder.final))
    summary = _read_summary(files["summary_csv"])
    record.log_files(files.values(), artifact_path="final")
    return FinalResult(options.study, storage, folder.final, files, summary, summary_verdicts(summary, BASELINE_LABEL))


def _read_summary(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    return pd.read_csv(path).to_dict(orient="records")


# ----------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clipse.final", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, FinalOptions)
    add_tracking_arguments(parser, "runs")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    configure_logging()
    args = build_parser().parse_args(argv)
    options = from_arguments(FinalOptions, args, tracking=config_overrides(args))
    result = run_final(options)
    if result.interrupted:
        shown = [a.replace(options.storage, result.storage) if options.storage else a for a in argv]
        print(f"\ninterrupted; finished runs are kept. Continue with:\n  python -m clipse.final "
              f"{' '.join(shlex.quote(a) for a in shown)}", file=sys.stderr)
        return 130
    print(result.files["summary_md"].read_text())
    print("files:\n" + "\n".join(f"  {p}" for p in result.files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
