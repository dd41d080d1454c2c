"""Journal files survive a crash mid-write: torn tails are cut, corrupt journals refused and repaired."""

from __future__ import annotations

import logging

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend
from test_search import options

from clipse.journal import main as journal_main
from clipse.search.command import run_search
from clipse.search.journal import check_journal
from clipse.search.study import count_trials, open_storage
from clipse.util.errors import UserError

TORN = b'{"op_code": 5, "worker_id": "x", "trial_id": 1, "sta'


def plain_study(journal, trials=3) -> None:
    """A study of `trials` finished trials written through clipse's storage (no training)."""
    study = optuna.create_study(study_name="s", storage=open_storage(str(journal)), direction="maximize")
    for value in range(trials):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        study.tell(trial, float(value))


def loaded_by_plain_optuna(journal) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    return optuna.load_study(study_name="s", storage=storage).get_trials()


def test_a_torn_tail_is_moved_aside_on_open_and_every_complete_record_kept(tmp_path, caplog):
    journal = tmp_path / "journal.log"
    plain_study(journal)
    sound = journal.read_bytes()
    with open(journal, "ab") as handle:
        handle.write(TORN)
    with caplog.at_level(logging.WARNING, logger="clipse"):
        storage = open_storage(str(journal))
    assert journal.read_bytes() == sound
    aside = list(tmp_path.glob("journal.log.torn-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == TORN
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(journal) in warning and str(aside[0]) in warning
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.value for t in study.get_trials()] == [0.0, 1.0, 2.0]


def test_no_record_is_ever_appended_behind_a_torn_one(tmp_path):
    """A writer that crashes mid-append while others keep writing: the next append cuts the torn
    tail first (without it, the two records are glued and the study cannot be read)."""
    journal = tmp_path / "journal.log"
    plain_study(journal, trials=1)
    study = optuna.load_study(study_name="s", storage=open_storage(str(journal)))
    with open(journal, "ab") as handle:  # another worker dies mid-write while this one runs
        handle.write(TORN)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    study.tell(trial, 5.0)
    assert check_journal(journal).sound
    assert [t.value for t in loaded_by_plain_optuna(journal)] == [0.0, 5.0]
    assert [p.read_bytes() for p in tmp_path.glob("journal.log.torn-*")] == [TORN]


def glued_journal(tmp_path):
    """What plain Optuna makes of a torn tail: the next writer's record glued behind it, mid-file
    (here the record creating the third trial)."""
    journal = tmp_path / "journal.log"
    plain_study(journal, trials=3)
    lines = journal.read_bytes().splitlines(keepends=True)
    third_created = [i for i, line in enumerate(lines) if line.startswith(b'{"op_code":4,')][2]
    journal.write_bytes(b"".join(lines[:third_created]) + TORN + b"".join(lines[third_created:]))
    with pytest.raises(ValueError):  # plain Optuna cannot read it any more
        loaded_by_plain_optuna(journal)
    return journal


def test_a_journal_corrupt_in_the_middle_is_refused_and_left_untouched(tmp_path):
    journal = glued_journal(tmp_path)
    before = journal.read_bytes()
    line = before[:before.index(TORN)].count(b"\n") + 1
    with pytest.raises(UserError) as refused:
        open_storage(str(journal))
    message = str(refused.value)
    assert f"line {line}" in message and f"python -m clipse.journal repair {journal}" in message
    assert "\n" not in message
    assert journal.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["journal.log"]


def test_repair_keeps_every_readable_record_and_the_original(tmp_path, capsys):
    journal = glued_journal(tmp_path)
    before = journal.read_bytes()
    assert journal_main(["check", str(journal)]) == 2
    assert "is corrupt" in capsys.readouterr().err
    assert journal_main(["repair", str(journal)]) == 0
    printed = capsys.readouterr().out
    assert "recovered 1 glued behind a torn one" in printed
    backup = next(tmp_path.glob("journal.log.bak-*"))
    assert backup.read_bytes() == before
    # the glued trial (after the torn record) is recovered too
    assert [t.value for t in loaded_by_plain_optuna(journal)] == [0.0, 1.0, 2.0]
    assert journal_main(["check", str(journal)]) == 0
    assert "sound" in capsys.readouterr().out


def test_check_of_a_missing_study_is_one_line(tmp_path, capsys):
    assert journal_main(["check", "nope", "--studies-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


@pytest.mark.slow
def test_a_finished_study_with_a_torn_journal_resumes_to_its_total(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_search(options(tmp_path, "baseline", 2, training={"epochs": 1})).counts.complete == 2
    journal = tmp_path / "studies" / "baseline" / "journal.log"
    with open(journal, "ab") as handle:
        handle.write(TORN)
    result = run_search(options(tmp_path, "baseline", 3, training={"epochs": 1}))
    assert result.counts.complete == 3
    assert count_trials(optuna.load_study(study_name="baseline", storage=open_storage(str(journal)))).complete == 3
    assert [p.read_bytes() for p in journal.parent.glob("journal.log.torn-*")] == [TORN]
    assert check_journal(journal).sound


def test_repair_will_not_renumber_trials_unless_forced(tmp_path, capsys):
    """An unreadable line that may have created a trial (not a torn record with one glued behind
    it): dropping it would shift every later trial's id, so repair refuses without --force."""
    journal = tmp_path / "journal.log"
    plain_study(journal, trials=3)
    lines = journal.read_bytes().splitlines(keepends=True)
    second_created = [i for i, line in enumerate(lines) if line.startswith(b'{"op_code":4,')][1]
    lines[second_created] = lines[second_created][:20] + b"\n"  # damaged in place, newline kept
    journal.write_bytes(b"".join(lines))
    before = journal.read_bytes()
    assert journal_main(["repair", str(journal)]) == 2
    assert f"line {second_created + 1} cannot be read and may have created a trial" in capsys.readouterr().err
    assert journal.read_bytes() == before and not list(tmp_path.glob("journal.log.bak-*"))
    assert journal_main(["repair", "--force", str(journal)]) == 0
    assert "dropped 1 unreadable lines" in capsys.readouterr().out
    assert check_journal(journal).sound


def test_repair_of_a_torn_tail_keeps_the_last_complete_record(tmp_path, capsys):
    """A writer killed mid-append at the end of the journal: repair cuts the torn bytes and keeps
    every complete record, the last one before them included."""
    journal = tmp_path / "journal.log"
    plain_study(journal, trials=3)
    sound = journal.read_bytes()
    journal.write_bytes(sound + TORN)
    assert journal_main(["repair", str(journal)]) == 0
    assert journal.read_bytes() == sound
    assert [t.value for t in loaded_by_plain_optuna(journal)] == [0.0, 1.0, 2.0]
