"""Full disks, quotas and file-size limits: a write that fails keeps the previous checkpoint and
rows, leaves no half-written file, and is one clear line (a retry in a search).

The limit is a real one: RLIMIT_FSIZE in a child process, whose writes beyond it fail with EFBIG
(Python ignores SIGXFSZ), as they would fail with ENOSPC on a full disk."""

from __future__ import annotations

import errno
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from clipse.config import config_yaml
from clipse.training.trainer import train
from clipse.util.errors import StorageFull


def limited_to(size: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


def run_limited(size: int, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=limited_to(size),
                          timeout=300)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_an_append_that_does_not_fit_leaves_no_half_row(tmp_path):
    csv_path, registry = tmp_path / "epochs.csv", tmp_path / "registry.csv"
    csv_path.write_text("epoch,value\n1,0.5\n")
    code = f"""
import sys
from pathlib import Path
from clipse.util.errors import StorageFull
from clipse.runs.registry import append_row
from clipse.runs.folder import append_csv
for write in (lambda: append_csv(Path({str(csv_path)!r}), [{{"epoch": 2, "value": "x" * 500}}]),
              lambda: append_row(Path({str(registry)!r}), {{"run_id": "r", "params": "y" * 5000}})):
    try:
        write()
    except StorageFull as exc:
        print(exc)
"""
    done = run_limited(400, code)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and "File too large" in lines[0] and str(csv_path) in lines[0]
    assert str(registry) in lines[1]
    assert csv_path.read_text() == "epoch,value\n1,0.5\n"
    assert registry.read_text() == ""  # not even a header without its row


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one_and_resume_finishes(tiny, tmp_path):
    config = tiny(epochs=2)
    assert train(config, [lambda epoch: True]).status == "stopped"  # after epoch 1, as a pruned trial
    run = Path(config.run_dir)
    before = snapshot(run)
    config_file = tmp_path / "settings.yaml"
    config_file.write_text(config_yaml(config.replace(resume=True)))
    code = f"from clipse.train import main; raise SystemExit(main(['--config', {str(config_file)!r}]))"
    done = run_limited(len(before["last.pt"]) // 2, code)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith("INFO ")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write") and "File too large" in errors[0]
    after = snapshot(run)
    assert after["last.pt"] == before["last.pt"] and after["epochs.csv"] == before["epochs.csv"]
    assert after["training.csv"] == before["training.csv"]
    assert set(after) <= set(before)  # no half-written last.pt / best.pt / result.json, no temporary file
    resumed = train(config.replace(resume=True))
    assert resumed.status == "completed" and resumed.epochs_done == 2
    assert [row.split(",")[0] for row in (run / "epochs.csv").read_text().splitlines()[1:]] == ["1", "2"]


@pytest.mark.slow
def test_a_search_trial_that_hits_a_full_disk_fails_with_one_line_and_its_retry_resumes(tmp_path, monkeypatch):
    from helpers import load_study
    from optuna.trial import TrialState
    from test_search import options

    import clipse.runs.folder as run_folder
    from clipse.search.command import run_search

    monkeypatch.chdir(tmp_path)
    real_save, calls = run_folder.torch.save, [0]

    def disk_full_on_third_save(payload, path):
        calls[0] += 1
        if calls[0] == 3:  # epoch 1 saved best.pt and last.pt; epoch 2's best.pt does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(payload, path)

    monkeypatch.setattr(run_folder.torch, "save", disk_full_on_third_save)
    result = run_search(options(tmp_path, "baseline", 1, pruner="none", training={"epochs": 2}))
    trials = load_study(tmp_path, "baseline").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    error = trials[0].user_attrs["error"]
    assert error.startswith("StorageFull: cannot write") and "No space left on device" in error
    assert trials[1].user_attrs["retry_of"] == 0
    epochs = (Path(trials[1].user_attrs["run_dir"]) / "epochs.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in epochs] == ["1", "2"]
    assert calls[0] <= 5  # the retry saved epoch 2 only (epoch 1 again would add best.pt and last.pt)
    assert result.counts.complete == 1


def test_storage_full_names_the_file_and_other_os_errors_pass_through(tmp_path):
    from clipse.util.errors import storage_full_is_one_line

    with pytest.raises(StorageFull, match="cannot write /x/y: Disk quota exceeded"):
        with storage_full_is_one_line(Path("/x/y")):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(PermissionError):
        with storage_full_is_one_line(Path("/x/y")):
            raise PermissionError(errno.EACCES, "Permission denied")
