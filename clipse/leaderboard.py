"""One leaderboard across studies:

    python -m clipse.leaderboard --studies debias,bandpass,dcl,hcl --baseline-study baseline

Takes each study's best configuration (its confirmed best first, as ``clipse.final`` does) and
the baseline study's best, trains them all with the same seeds and budget (reusing the runs a
previous call trained), tests them on the test split and writes to ``studies/leaderboard/``
(``--name``): ``leaderboard.md`` and ``leaderboard.csv`` (configurations ranked by test R@1
mean, each against the baseline), ``leaderboard.png``, and the report's ``runs.csv``,
``summary.csv`` and ``summary.md``. With m comparisons against one baseline, every interval is
a Bonferroni interval at 1 − 0.05/m, so that the chance that any of them misses its true
difference (the family-wise error) is at most 5%. Studies made on other data or with another
budget are refused with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from clipse.config import (
    TEST_SET_KEYS,
    TrainConfig,
    add_tracking_arguments,
    config_overrides,
)
from clipse.evaluation.statistics import family_confidence
from clipse.executors import ExecutorOptions
from clipse.report.leaderboard import (
    leaderboard_markdown,
    leaderboard_table,
    plot_leaderboard,
)
from clipse.report.summary import RunRecord, write_report
from clipse.search.best import best_trials, describe_values, open_study
from clipse.search.outages import announce_outages
from clipse.search.planned_runs import PlannedRun, train_planned
from clipse.search.study import secure_storage, stored_settings, trial_settings
from clipse.training import build_embedded_model
from clipse.util.errors import UserError, cli_main, configure_logging
from clipse.util.fields import add_arguments, check_at_least, from_arguments, setting
from clipse.util.paths import DEFAULT_STUDIES_DIR, StudyFolder

BASELINE_LABEL = "baseline"
BUDGET_KEYS = (*TEST_SET_KEYS, "epochs", "batch_size")  # what the studies must share to be compared


@dataclass
class LeaderboardOptions:
    """Everything ``clipse.leaderboard`` takes; every field is a flag."""

    studies: str = setting(help="the studies to rank, separated by commas")
    baseline_study: str = setting("baseline", "the study whose best trial every study is compared with")
    name: str = setting("leaderboard", "the leaderboard's folder in --studies-dir")
    storage: str | None = setting(None, "the studies' storage (an RDB URL holding them all)",
                                  shown_default="each study's journal")
    studies_dir: Path = setting(DEFAULT_STUDIES_DIR, "where study folders live")
    seeds: int = setting(3, "training seeds per configuration")
    epochs: int | None = setting(None, "epoch budget of every run", shown_default="the studies' (which must agree)")
    resamples: int = setting(2000, "bootstrap resamples")
    execution: ExecutorOptions = setting(default_factory=ExecutorOptions, nested=True)
    tracking: dict[str, Any] = field(default_factory=dict)


@dataclass
class LeaderboardResult:
    folder: Path
    files: dict[str, Path]
    table: pd.DataFrame              # one row per configuration, best first
    interrupted: bool = False


def chosen_configurations(options: LeaderboardOptions, storage: str | None) -> tuple[list[tuple[str, dict]], TrainConfig,
                                                                                       list[str]]:
    """(label, settings) of each study's best and the baseline study's best, the shared base
    configuration, and a line describing each; refuses studies of other data or budgets."""
    names = [name.strip() for name in options.studies.split(",") if name.strip()]
    if not names:
        raise UserError("--studies: name at least one study")
    if options.baseline_study in names:
        raise UserError(f"--studies: '{options.baseline_study}' is the baseline study; it is on every row already")
    chosen, described, bases = [], [], {}
    for name in [*names, options.baseline_study]:
        study = open_study(name, options.studies_dir, storage)
        settings = stored_settings(study)
        trial = best_trials(study, 1)[0]
        base = settings.base_config()
        if options.epochs is not None:
            base = base.replace(epochs=options.epochs)
        bases[name] = base
        label = BASELINE_LABEL if name == options.baseline_study else f"{name}-trial-{trial.number}"
        chosen.append((label, trial_settings(study, trial)))
        described.append(f"`{label}`: best trial #{trial.number} of study '{name}' "
                         f"({describe_values(settings.metrics, trial, study)}), loss {chosen[-1][1]['loss']}")
    reference = bases[options.baseline_study].to_mapping()
    for name, base in bases.items():
        differs = [key for key in BUDGET_KEYS if base.to_mapping()[key] != reference[key]]
        if differs:
            raise UserError(f"study '{name}' was made on other data or with another budget than "
                            f"'{options.baseline_study}' ({', '.join(differs)}); a leaderboard compares like with like")
    return chosen, bases[options.baseline_study], described


def run_leaderboard(options: LeaderboardOptions) -> LeaderboardResult:
    """Plan, train (reusing finished runs) and rank; see the module docstring."""
    check_at_least(options, 1, "seeds", "resamples")
    announce_outages()
    with secure_storage(options.storage) if options.storage else contextlib.nullcontext() as storage:
        chosen, base, described = chosen_configurations(options, storage)
        folder = StudyFolder.of(options.studies_dir, options.name)
        runs = []
        for label, settings in chosen:
            config = TrainConfig.from_mapping({**settings, **options.tracking}, f"{label} settings", base=base)
            for seed in range(options.seeds):
                runs.append(PlannedRun(label, seed, config.replace(
                    seed=seed, eval_test=True, resume=True, progress=False, study=options.name, trial=None,
                    registry=str(folder.registry), run_dir=str(folder.path / "runs" / f"{label}-seed{seed}")).validate()))
        for run in runs:
            build_embedded_model(run.config)
        if not train_planned(runs, options.execution, folder.slurm, options.name, f"leaderboard {options.name}",
                             folder.path / "runs"):
            return LeaderboardResult(folder.path, {}, pd.DataFrame(), interrupted=True)
        comparisons = len(chosen) - 1
        confidence = family_confidence(comparisons)
        intro = "\n".join([f"# Leaderboard '{options.name}'", "", *[f"- {line}" for line in described],
                           f"- seeds {', '.join(map(str, range(options.seeds)))}; {base.epochs} epochs per run; each "
                           f"run's best validation epoch is evaluated on the test split"])
        files = write_report([RunRecord(r.folder.path, r.label, r.seed) for r in runs], BASELINE_LABEL, folder.path,
                             intro, options.resamples, confidence)
        runs_table = pd.read_csv(files["runs"])
        table = leaderboard_table(pd.read_csv(files["summary_csv"]), runs_table, BASELINE_LABEL)
        files["leaderboard_csv"] = folder.path / "leaderboard.csv"
        table.to_csv(files["leaderboard_csv"], index=False)
        files["leaderboard_md"] = folder.path / "leaderboard.md"
        files["leaderboard_md"].write_text(leaderboard_markdown(table, intro, comparisons, confidence))
        files["leaderboard_png"] = plot_leaderboard(table, folder.path / "leaderboard.png", confidence)
        return LeaderboardResult(folder.path, files, table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clipse.leaderboard", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, LeaderboardOptions)
    add_tracking_arguments(parser, "runs")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    result = run_leaderboard(from_arguments(LeaderboardOptions, args, tracking=config_overrides(args)))
    if result.interrupted:
        print("\ninterrupted; finished runs are kept. Run the same command again to continue.", file=sys.stderr)
        return 130
    print(result.files["leaderboard_md"].read_text())
    print("files:\n" + "\n".join(f"  {p}" for p in result.files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
