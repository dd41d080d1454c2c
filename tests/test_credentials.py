"""A PostgreSQL password never leaves the coordinator's memory and environment: not in what
clipse prints, not in any file it writes (run folders, registry, SLURM job scripts and the
pickles submitit writes), not in study or trial attributes. It reaches the workers through
PGPASSWORD; PGPASSWORD and a pgpass file work without a password in the URL."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import optuna
import pytest

from clipse.search.command import SearchOptions, run_search
from clipse.search.study import count_trials, secure_storage
from clipse.util.errors import UserError

TINY = ["--pretrained", "none", "--shapes-train-images", "48", "--shapes-val-images", "12", "--shapes-test-images", "12",
        "--batch-size", "16", "--epochs", "1"]


def search(tmp_path, storage, trials, *extra):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PGPASS")}
    return subprocess.run([sys.executable, "-m", "clipse.search", "--space", "baseline", "--trials", str(trials),
                           "--studies-dir", str(tmp_path / "studies"), "--data-root", str(tmp_path / "shapes"),
                           "--storage", storage, *TINY, *extra], capture_output=True, text=True, cwd=tmp_path,
                          env=environment, timeout=600)


def assert_nowhere(password, tmp_path, result, url):
    assert password not in result.stdout + result.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written
    for path in written:
        assert password.encode() not in path.read_bytes(), path
    study = optuna.load_study(study_name="baseline", storage=url.replace("@", f":{password}@", 1))
    attrs = json.dumps([study.user_attrs] + [[t.user_attrs, t.system_attrs] for t in study.get_trials()],
                       default=str)
    assert password not in attrs
    return study


def with_password(url, password):
    return url.replace("@", f":{password}@", 1)


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.long
def test_password_in_the_url_is_kept_out_of_everything(postgres_secret, tmp_path):
    url, password = postgres_secret
    result = search(tmp_path, with_password(url, password), 2, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert f"optuna-dashboard {url} " in result.stdout  # the printed command, without the password
    study = assert_nowhere(password, tmp_path, result, url)
    assert count_trials(study).finished == 2
    assert len({t.user_attrs["clipse:owner"]["pid"] for t in study.get_trials()}) == 2  # workers connected


@pytest.mark.postgres
@pytest.mark.slow
def test_the_password_is_really_required_and_pgpassword_or_pgpass_supply_it(postgres_secret, tmp_path,
                                                                              monkeypatch):
    url, password = postgres_secret
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.delenv("PGPASSFILE", raising=False)
    monkeypatch.chdir(tmp_path)
    options = SearchOptions(space="baseline", trials=1, storage=url, studies_dir=tmp_path / "studies",
                            training={"pretrained": "none", "shapes_train_images": 48, "shapes_val_images": 12, "shapes_test_images": 12,
                                      "batch_size": 16, "epochs": 1, "data_root": str(tmp_path / "shapes")})
    with pytest.raises(UserError, match="cannot open"):
        run_search(options)
    monkeypatch.setenv("PGPASSWORD", password)
    assert run_search(dataclasses.replace(options, study="by-env")).counts.complete == 1
    monkeypatch.delenv("PGPASSWORD")
    pgpass = tmp_path / "pgpass"
    host_port, database = url.split("@", 1)[1].split("/")
    user = url.split("//", 1)[1].split("@")[0]
    pgpass.write_text(f"{host_port}:{database}:{user}:{password}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    assert run_search(dataclasses.replace(options, study="by-file")).counts.complete == 1


@pytest.mark.postgres
@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_job_files_hold_no_password(postgres_secret, slurm_cluster, tmp_path):
    url, password = postgres_secret
    result = search(tmp_path, with_password(url, password), 1, "--executor", "slurm", "--cpus-per-task", "1",
                    "--mem-gb", "2", "--slurm-poll", "1", "--time-min", "20")
    assert result.returncode == 0, result.stderr
    job_files = list((tmp_path / "studies" / "baseline" / "slurm").rglob("*"))
    assert any(p.name.endswith("_submission.sh") for p in job_files)
    assert any(p.suffix == ".pkl" for p in job_files)
    study = assert_nowhere(password, tmp_path, result, url)
    assert count_trials(study).complete == 1
    assert all(t.user_attrs["clipse:owner"]["kind"] == "slurm" for t in study.get_trials())


@pytest.mark.parametrize("url,shown", [
    ("postgresql://u:s3cret@h:5432/db", "postgresql://u@h:5432/db"),
    ("postgresql+psycopg://u@h/db?password=s3cret&sslmode=require", "postgresql+psycopg://u@h/db?sslmode=require"),
])
def test_the_password_leaves_the_url_for_the_block_only(monkeypatch, url, shown):
    monkeypatch.setenv("PGPASSWORD", "the user's own")
    with secure_storage(url) as storage:
        assert storage == shown and os.environ["PGPASSWORD"] == "s3cret"
    assert os.environ["PGPASSWORD"] == "the user's own"
    monkeypatch.delenv("PGPASSWORD")
    with secure_storage(url):
        pass
    assert "PGPASSWORD" not in os.environ


@pytest.mark.parametrize("url,message", [
    ("postgresql://u:pw@h:notaport/db", "--storage: not a valid database URL"),
    ("postgresql+pg8000://u:pw@h/db", "a password in a postgresql+pg8000 URL would be written"),
    ("mysql://u:pw@h/db", "a password in a mysql URL would be written"),
])
def test_urls_whose_password_cannot_be_kept_secret_are_refused(url, message):
    with pytest.raises(UserError, match=re.escape(message)):
        with secure_storage(url):
            pass
