"""--confirm-top / --confirm-seeds: the best trials retrained with further seeds, the confirmed best
recorded in the study and used by clipse.final; confirmation runs resume after a kill and are
never trained twice."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import load_study, wait_for

from clipse.runs.folder import RunFolder
from clipse.search.best import best_trials
from clipse.search.command import SearchOptions, run_search
from clipse.search.confirm import CONFIRMED_ATTR
from clipse.util.errors import UserError

TINY = {"pretrained": "none", "shapes_train_images": 48, "shapes_val_images": 12, "shapes_test_images": 12, "batch_size": 16, "epochs": 2}


def options(tmp_path, **changes) -> SearchOptions:
    return SearchOptions(space="debias", trials=3, studies_dir=tmp_path / "studies", sampler="random", pruner="none",
                         min_weight_std=0.0,  # tiny runs barely reweight; the floor is tested elsewhere
                         training={**TINY, "data_root": str(tmp_path / "shapes")}, **changes)


@pytest.mark.slow
def test_the_confirmed_best_is_the_best_mean_over_all_seeds_and_final_takes_it(tmp_path):
    result = run_search(options(tmp_path, confirm_top=2, confirm_seeds=2))
    study = load_study(tmp_path, "debias")
    confirmed = study.user_attrs[CONFIRMED_ATTR]
    assert confirmed == result.confirmed and len(confirmed["trials"]) == 2
    by_value = sorted(study.get_trials(), key=lambda t: (-t.value, t.number))
    assert {row["trial"] for row in confirmed["trials"]} == {t.number for t in by_value[:2]}
    for row in confirmed["trials"]:
        trial = study.trials[row["trial"]]
        runs = [RunFolder(tmp_path / "studies" / "debias" / "confirm" / "runs" / f"trial-{row['trial']:05d}-seed{s}")
                for s in (1, 2)]  # the trial trained seed 0; its confirmation seeds 1 and 2
        assert row["seeds"] == [0, 1, 2]
        assert row["values"] == [trial.value] + [run.result().best_value for run in runs]
        assert row["mean"] == pytest.approx(np.mean(row["values"]))
    assert confirmed["best"] == max(confirmed["trials"], key=lambda r: r["mean"])["trial"]
    # clipse.final follows the confirmed order, not the single-seed values
    reversed_order = {**confirmed, "trials": confirmed["trials"][::-1], "best": confirmed["trials"][-1]["trial"]}
    study.set_user_attr(CONFIRMED_ATTR, reversed_order)
    assert [t.number for t in best_trials(study, 3)] == [r["trial"] for r in reversed_order["trials"]] + \
        [t.number for t in by_value if t.number not in {r["trial"] for r in confirmed["trials"]}]
    with pytest.raises(UserError, match="--confirm-top: a study of several objectives"):
        run_search(options(tmp_path, study="two", metric="val_i2t_r1,val_t2i_r1", confirm_top=1))


@pytest.mark.recovery
@pytest.mark.slow
def test_confirmation_runs_resume_after_a_kill_and_are_not_repeated(tmp_path):
    args = ["--space", "debias", "--trials", "1", "--pruner", "none", "--confirm-top", "1", "--confirm-seeds", "2",
            "--min-weight-std", "0",
            "--studies-dir", str(tmp_path / "studies"), "--data-root", str(tmp_path / "shapes"),
            "--pretrained", "none", "--shapes-train-images", "400", "--shapes-val-images", "12", "--shapes-test-images", "12",
            "--epochs", "3"]
    runs = tmp_path / "studies" / "debias" / "confirm" / "runs"
    process = subprocess.Popen([sys.executable, "-m", "clipse.search", *args], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: any(len(RunFolder(p).epoch_rows()) >= 1 for p in runs.glob("*")) if runs.exists()
                    else False)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed = next(p for p in runs.glob("*") if RunFolder(p).epoch_rows())
    assert RunFolder(killed).result() is None  # killed mid-run
    again = subprocess.run([sys.executable, "-m", "clipse.search", *args], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "confirmed best: trial 0" in again.stdout
    rows = RunFolder(killed).epoch_rows()
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]                   # no epoch trained twice
    assert len({row["trained_by_pid"] for row in rows}) == 2                  # resumed, not restarted
    third = subprocess.run([sys.executable, "-m", "clipse.search", *args], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0 and "2 of 2 runs already finished; training 0" in third.stderr
    assert sorted(p.name for p in runs.glob("*")) == ["trial-00000-seed1", "trial-00000-seed2"]
    assert all(Path(p / "result.json").exists() for p in runs.glob("*"))
