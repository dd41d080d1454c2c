"""A study's best configurations: found by name in its storage, ranked with the trials a search
confirmed with further seeds first (``clipse.search.confirm``). The final report and the
leaderboard take their configurations from here."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from clipse.search.confirm import confirmed_ranking, confirmed_row
from clipse.search.study import open_storage, ranked_trials, study_names
from clipse.util.errors import UserError
from clipse.util.paths import StudyFolder


def find_study(name: str, studies_dir: Path, storage: str | None) -> optuna.Study | None:
    """The study, or None when it does not exist; ``storage`` None means its own journal file."""
    journal = StudyFolder.of(studies_dir, name).journal
    if storage is None and not journal.exists():
        return None
    backend = open_storage(storage or str(journal))
    if name not in study_names(backend):
        return None
    return optuna.load_study(study_name=name, storage=backend)


def open_study(name: str, studies_dir: Path, storage: str | None) -> optuna.Study:
    study = find_study(name, studies_dir, storage)
    if study is not None:
        return study
    if storage is None:
        there = sorted(p.parent.name for p in Path(studies_dir).glob(f"*/{StudyFolder(Path()).journal.name}"))
        raise UserError(f"no study '{name}' in {studies_dir}/ (studies there: {', '.join(there) or 'none'})")
    names = study_names(open_storage(storage))
    raise UserError(f"no study '{name}' in {storage} (available: {', '.join(names) or 'none'})")


def best_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The k best completed trials; with several objectives, k trials of the Pareto front (by
    the mean of the objectives), or the whole front when it is smaller. Trials a search
    confirmed with further seeds (``clipse.search.confirm``) come first, by their confirmed mean."""
    ranked = ranked_trials(study)
    if not ranked:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        raise UserError(f"study '{study.study_name}' has no completed trial yet" if not complete else
                        f"study '{study.study_name}': none of its {len(complete)} completed trials is feasible (their "
                        "SANW weights spread less than the study's min weight std, or they forgot more zero-shot "
                        "accuracy than its max zero-shot drop)")
    confirmed = confirmed_ranking(study)
    by_number = {t.number: t for t in ranked}
    ranked = [by_number[n] for n in confirmed if n in by_number] + [t for t in ranked if t.number not in confirmed]
    return ranked[:k]


def describe_values(metrics: list[str], trial: optuna.trial.FrozenTrial, study: optuna.Study | None = None) -> str:
    text = ", ".join(f"{metric} {value:.4f}" for metric, value in zip(metrics, trial.values))
    confirmed = confirmed_row(study, trial.number) if study is not None else None
    if confirmed:
        text += f"; confirmed mean {confirmed['mean']:.4f} over {len(confirmed['values'])} seeds"
    return text
