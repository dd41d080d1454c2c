"""Checkpoint files are read with weights_only=True: a file whose pickle would run a command
is refused with one line and exit status 2 by every command that loads one, and the command
never runs; clipse's own checkpoints still load (the resume and eval tests)."""

import os
import subprocess
import sys

import pytest
import torch

from clipse.eval_retrieval import main as eval_main
from clipse.train import main as train_main

TINY = ["--pretrained", "none", "--shapes-train-images", "48", "--shapes-val-images", "12", "--shapes-test-images", "12",
        "--batch-size", "16", "--threads", "1", "--no-progress"]


class RunsCommand:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path):
    """(checkpoint path, marker): the marker appears only if the checkpoint's code runs."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": RunsCommand(marker), "epoch": 1}, path)
    return path, marker


@pytest.mark.slow
def test_the_file_really_runs_code_when_loaded_unsafely(evil):
    path, marker = evil
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"],
                   capture_output=True)
    assert marker.exists()  # so the refusals below are refusals of a real attack
    marker.unlink()


def one_line_refusal(code, err, path):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: refused") and "could run code" in lines[0]


@pytest.mark.slow
def test_pretrained_refuses_it(evil, tmp_path):
    path, marker = evil
    result = subprocess.run([sys.executable, "-m", "clipse.train", *TINY, "--pretrained", str(path),
                             "--run-dir", str(tmp_path / "run"), "--registry", str(tmp_path / "r.csv")],
                            capture_output=True, text=True)
    one_line_refusal(result.returncode, result.stderr, path)
    assert not marker.exists()


def test_eval_refuses_it(evil, capsys):
    path, marker = evil
    code = eval_main(["--checkpoint", str(path)])
    one_line_refusal(code, capsys.readouterr().err, path)
    assert not marker.exists()


def test_resume_refuses_a_planted_last_checkpoint(evil, tmp_path, capsys):
    path, marker = evil
    run = tmp_path / "run"
    args = [*TINY, "--epochs", "2", "--run-dir", str(run), "--registry", str(tmp_path / "r.csv"),
            "--data-root", str(tmp_path / "shapes")]
    assert train_main(args) == 0
    (run / "result.json").unlink()  # as if the run had been interrupted
    os.replace(path, run / "last.pt")
    capsys.readouterr()
    code = train_main([*args, "--resume"])
    one_line_refusal(code, capsys.readouterr().err, run / "last.pt")
    assert not marker.exists()
