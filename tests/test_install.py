"""clipse installed as a wheel (how a cluster's shared environment or a container is built), not
from the clone: the search spaces come with it, and a search runs from any directory."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent


def tracked_copy(destination: Path) -> Path:
    """The project's files as a fresh clone has them (no venv, studies or build leftovers)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (PROJECT / name).is_file():
            shutil.copy2(PROJECT / name, target)
    return destination


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not (PROJECT / ".git").exists(), reason="needs the git clone")
def test_a_wheel_in_a_fresh_environment_searches_from_another_directory(tmp_path):
    source = tracked_copy(tmp_path / "source")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "wheels"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(fresh)], check=True)
    python = fresh / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the heavy dependencies (torch, open_clip, optuna ...) from this environment, not clipse itself
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((tmp_path / "wheels").glob("clipse-*.whl"))
    installed = subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], capture_output=True,
                               text=True)
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([python, "-c", "import clipse, search_spaces; print(clipse.__file__, search_spaces.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, env=env)
    assert where.returncode == 0 and all(path.startswith(site) for path in where.stdout.split()), where
    search = subprocess.run(
        [python, "-m", "clipse.search", "--space", "bandpass", "--trials", "1", "--epochs", "1",
         "--pretrained", "none", "--shapes-train-images", "48", "--shapes-val-images", "12", "--shapes-test-images", "12",
         "--batch-size", "16", "--data-root", str(tmp_path / "shapes")],
        cwd=elsewhere, capture_output=True, text=True, env=env, timeout=600)
    assert search.returncode == 0, search.stderr
    assert "1/1 trials done" in search.stderr and (elsewhere / "studies" / "bandpass" / "journal.log").is_file()
